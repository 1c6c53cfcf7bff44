"""Behaviour tests of the T5 network on a tiny config, and of the gin model files."""

import functools
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmindexer_jax import t5

jax.config.update("jax_numpy_rank_promotion", "raise")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOGICAL_AXES = {"batch", "length", "embed", "mlp", "heads", "kv", "vocab", "relpos_buckets"}

ENCODER_TOKENS = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 12, 1, 0, 0]], np.int32)
DECODER_TOKENS = np.array([[0, 20, 21, 22, 1], [0, 30, 31, 1, 0]], np.int32)


def tiny_config(**overrides) -> t5.T5Config:
  kwargs = dict(vocab_size=64, emb_dim=32, num_heads=2, num_encoder_layers=2,
                num_decoder_layers=2, head_dim=16, mlp_dim=64, dropout_rate=0.0)
  kwargs.update(overrides)
  return t5.T5Config(**kwargs)


def init_params(cfg: t5.T5Config, seed: int = 0):
  """Random parameters with the model's tree and shapes.

  Drawn with numpy from `jax.eval_shape(init)`: compiling the initialisers eagerly costs
  seconds of CPU per config. Scales follow T5's init (fan-in kernels, unit embeddings).
  """
  abstract = jax.eval_shape(lambda: t5.Transformer(cfg).init(
      jax.random.key(0), ENCODER_TOKENS, DECODER_TOKENS, enable_dropout=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
    fan_in = 1
    if name.endswith("['kernel']"):
      fan_in = int(np.prod(leaf.shape[:2])) if "['out']" in name else leaf.shape[0]
    return rng.normal(scale=fan_in**-0.5, size=leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract["params"]))


@pytest.fixture(scope="module", params=["v1_0", "v1_1"])
def model_and_params(request):
  if request.param == "v1_0":
    cfg = tiny_config()
  else:
    cfg = tiny_config(mlp_activations=("gelu", "linear"), logits_via_embedding=False)
  return t5.Transformer(cfg), init_params(cfg)


def _logits(model, params, encoder_tokens, decoder_tokens):
  return np.asarray(model.apply({"params": params}, encoder_tokens, decoder_tokens,
                                enable_dropout=False))


def test_relative_position_bucket_hand_values():
  # Bidirectional, 32 buckets, max distance 128: 16 buckets per direction, 8 exact ones, keys
  # after the query offset by 16; larger distances get 8 + floor(log(n / 8) / log(16) * 8).
  relative = np.array([0, -1, -7, 1, 7, -8, -12, -20, -50, -127, -128, -1000, 1000])
  expected = [0, 1, 7, 17, 23, 8, 9, 10, 13, 15, 15, 15, 31]
  np.testing.assert_array_equal(t5.relative_position_bucket(relative, True, 32, 128), expected)
  # Unidirectional (decoder): keys after the query all share bucket 0, 16 exact buckets, then
  # 16 + floor(log(n / 16) / log(8) * 16).
  relative = np.array([5, 0, -3, -15, -16, -20, -50, -128, -500])
  expected = [0, 0, 3, 15, 16, 17, 24, 31, 31]
  np.testing.assert_array_equal(t5.relative_position_bucket(relative, False, 32, 128), expected)


def test_decoder_is_causal(model_and_params):
  model, params = model_and_params
  changed = DECODER_TOKENS.copy()
  changed[:, 3] = 40
  before = _logits(model, params, ENCODER_TOKENS, DECODER_TOKENS)
  after = _logits(model, params, ENCODER_TOKENS, changed)
  np.testing.assert_array_equal(before[:, :3], after[:, :3])
  assert np.abs(before[:, 3:] - after[:, 3:]).max() > 1e-3
  # t5x's target-padding mask changes nothing at real (right-padded) target positions.
  targets = np.pad(DECODER_TOKENS[:, 1:], ((0, 0), (0, 1)))
  masked = model.apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS, targets,
                       enable_dropout=False)
  np.testing.assert_allclose(np.asarray(masked)[targets > 0], before[targets > 0], atol=1e-5)


def test_encoder_output_ignores_appended_padding(model_and_params):
  model, params = model_and_params
  padded = np.pad(ENCODER_TOKENS, ((0, 0), (0, 3)))
  encode = lambda tokens: np.asarray(  # noqa: E731
      model.apply({"params": params}, tokens, enable_dropout=False, method=model.encode))
  short, long = encode(ENCODER_TOKENS), encode(padded)
  mask = ENCODER_TOKENS > 0
  np.testing.assert_allclose(short[mask], long[:, :6][mask], atol=1e-5)
  np.testing.assert_allclose(_logits(model, params, ENCODER_TOKENS, DECODER_TOKENS),
                             _logits(model, params, padded, DECODER_TOKENS), atol=1e-5)


def test_every_parameter_has_logical_axes(model_and_params):
  model, _ = model_and_params
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ENCODER_TOKENS, DECODER_TOKENS))
  specs = nn.get_partition_spec(abstract)["params"]
  shapes = nn.unbox(abstract)["params"]
  flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: x is None)[0]
  flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
  assert len(flat_specs) == len(flat_shapes)
  for path, spec in flat_specs:
    name = jax.tree_util.keystr(path)
    assert spec is not None, f"{name} has no logical axes"
    assert len(spec) == len(flat_shapes[path].shape), name
    assert set(spec) <= _LOGICAL_AXES, f"{name}: {spec}"


def test_runs_under_logical_axis_rules_and_a_mesh():
  cfg = tiny_config(mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                    num_encoder_layers=1, num_decoder_layers=1)
  model, params = t5.Transformer(cfg), init_params(cfg)
  rules = (("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"),
           ("embed", None), ("kv", None), ("length", None), ("relpos_buckets", None))
  mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ENCODER_TOKENS, DECODER_TOKENS))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    sharded = jax.device_put(params, shardings["params"])
    logits = jax.jit(lambda p: model.apply({"params": p}, ENCODER_TOKENS, DECODER_TOKENS,
                                           enable_dropout=False))(sharded)
  np.testing.assert_allclose(np.asarray(logits), _logits(model, params, ENCODER_TOKENS,
                                                         DECODER_TOKENS), atol=1e-5)


def test_bfloat16_compute_is_close_to_float32(model_and_params):
  model, params = model_and_params
  bf16 = t5.Transformer(model.config.replace(dtype="bfloat16"))
  logits = model.apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS, enable_dropout=False)
  logits_bf16 = bf16.apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS,
                           enable_dropout=False)
  encoded_bf16 = bf16.apply({"params": params}, ENCODER_TOKENS, enable_dropout=False,
                            method=bf16.encode)
  assert encoded_bf16.dtype == jnp.bfloat16
  assert logits_bf16.dtype == jnp.float32
  scale = float(jnp.abs(logits).max())
  assert float(jnp.abs(logits_bf16 - logits).max()) < 0.05 * scale


def test_dropout_needs_enable_dropout_and_an_rng():
  model = t5.Transformer(tiny_config(dropout_rate=0.3, num_encoder_layers=1, num_decoder_layers=1))
  params = init_params(model.config)
  # 'rbg' keys: threefry dropout masks take seconds to compile on CPU.
  key = functools.partial(jax.random.key, impl="rbg")
  reference = _logits(model, params, ENCODER_TOKENS, DECODER_TOKENS)
  ignored_rng = model.apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS,
                            enable_dropout=False, rngs={"dropout": key(1)})
  np.testing.assert_array_equal(reference, ignored_rng)
  dropped = jax.jit(lambda rng: model.apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS,
                                            enable_dropout=True, rngs={"dropout": rng}))
  assert np.abs(dropped(key(1)) - reference).max() > 1e-3
  assert np.abs(dropped(key(1)) - dropped(key(2))).max() > 1e-3
  with pytest.raises(Exception, match="dropout"):
    model.apply({"params": params}, ENCODER_TOKENS, DECODER_TOKENS, enable_dropout=True)


def test_bernoulli_keep_rate_independence_and_sharding():
  shape = (8, 40, 101)  # odd last dimension: the last 32-bit word is half used
  keep, keep_prob = t5.bernoulli_keep(jax.random.key(0), 0.7, shape)
  assert keep.shape == shape and keep.dtype == jnp.bool_
  assert float(keep_prob) == 1 - round(0.3 * 65536) / 65536
  assert abs(float(keep.mean()) - 0.7) < 0.01
  # The two 16-bit draws of one word are independent: both dropped at rate 0.3**2.
  both_dropped = ~keep[..., 0:100:2] & ~keep[..., 1:100:2]
  assert abs(float(both_dropped.mean()) - 0.09) < 0.01
  assert np.array_equal(t5.bernoulli_keep(jax.random.key(0), 0.7, shape)[0], keep)
  assert not np.array_equal(t5.bernoulli_keep(jax.random.key(1), 0.7, shape)[0], keep)
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
  sharded = jax.jit(lambda r: t5.bernoulli_keep(r, 0.7, (8, 40, 100))[0],
                    out_shardings=sharding)(jax.random.key(0))
  np.testing.assert_array_equal(sharded, t5.bernoulli_keep(jax.random.key(0), 0.7,
                                                           (8, 40, 100))[0])


def test_dropout_zeroes_or_rescales_and_keeps_the_mean():
  x = jnp.arange(1.0, 4001.0).reshape(40, 100)
  dropout = t5.Dropout(rate=0.25)
  y = dropout.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert abs(kept.mean() - 0.75) < 0.02
  assert abs(float(y.mean()) / float(x.mean()) - 1) < 0.03
  np.testing.assert_array_equal(dropout.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(t5.Dropout(rate=0.0).apply({}, x, deterministic=False), x)


def test_hidden_embed_and_logits_from_hidden(model_and_params):
  model, params = model_and_params
  cfg = model.config
  encoded = model.apply({"params": params}, ENCODER_TOKENS, enable_dropout=False,
                        method=model.encode)
  logits, hidden = model.apply({"params": params}, encoded, ENCODER_TOKENS, DECODER_TOKENS,
                               enable_dropout=False, return_hidden=True, method=model.decode)
  assert hidden.shape == (*DECODER_TOKENS.shape, cfg.emb_dim)
  again = model.apply({"params": params}, hidden, method=model.logits_from_hidden)
  np.testing.assert_allclose(again, logits, atol=1e-6)
  head = model.apply({"params": params}, method=model.lm_head)
  assert head.shape == (cfg.emb_dim, cfg.vocab_size) and head.dtype == jnp.float32
  np.testing.assert_allclose(hidden @ head, logits, atol=1e-5)
  embedding = params["token_embedder"]["embedding"]
  if cfg.logits_via_embedding:  # hidden is taken before the emb_dim**-0.5 rescale
    np.testing.assert_allclose(logits, hidden * cfg.emb_dim**-0.5 @ embedding.T, atol=1e-4)
  embedded = model.apply({"params": params}, DECODER_TOKENS, method=model.embed)
  np.testing.assert_array_equal(embedded, embedding[DECODER_TOKENS])


def test_cached_decoding_matches_full_decoding(model_and_params):
  model, params = model_and_params
  batch, length = DECODER_TOKENS.shape
  encoded = model.apply({"params": params}, ENCODER_TOKENS, enable_dropout=False,
                        method=model.encode)
  # Recipe from the Transformer docstring: a full-length decode=True call creates the cache.
  _, variables = model.apply({"params": params}, encoded, ENCODER_TOKENS,
                             jnp.zeros((batch, length), jnp.int32), decode=True,
                             enable_dropout=False, mutable=["cache"], method=model.decode)
  cache = variables["cache"]
  # model.init(..., decode=True) makes the same cache.
  from_init = jax.eval_shape(lambda: model.init(
      jax.random.key(0), ENCODER_TOKENS, jnp.zeros((batch, length), jnp.int32),
      enable_dropout=False, decode=True)["cache"])
  assert jax.tree.map(jnp.shape, from_init) == jax.tree.map(jnp.shape, cache)
  assert cache["decoder"]["layers_0"]["self_attention"]["cached_key"].shape == (
      batch, length, model.config.num_heads, model.config.head_dim)

  @jax.jit
  def step(cache, tokens_Bx1):
    logits_Bx1xV, variables = model.apply(
        {"params": params, "cache": cache}, encoded, ENCODER_TOKENS, tokens_Bx1, decode=True,
        enable_dropout=False, mutable=["cache"], method=model.decode)
    return logits_Bx1xV, variables["cache"]

  steps = []
  for i in range(length):
    logits_Bx1xV, cache = step(cache, DECODER_TOKENS[:, i:i + 1])
    steps.append(logits_Bx1xV)
  np.testing.assert_allclose(np.concatenate(steps, axis=1),
                             _logits(model, params, ENCODER_TOKENS, DECODER_TOKENS), atol=1e-5)
  with pytest.raises(ValueError, match="one decoder token"):
    model.apply({"params": params, "cache": cache}, encoded, ENCODER_TOKENS, DECODER_TOKENS[:, :2],
                decode=True, enable_dropout=False, mutable=["cache"], method=model.decode)


def test_unknown_activation_is_rejected():
  with pytest.raises(ValueError, match="mlp_activations"):
    init_params(tiny_config(mlp_activations=("gelu_exact",)))


def _gin_config(gin_file: str, bindings=()) -> t5.T5Config:
  gin.clear_config()
  try:
    gin.add_config_file_search_path(_REPO)
    gin.parse_config_files_and_bindings([gin_file], list(bindings))
    return gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("gin_file, expected", [
    ("t5_tiny.gin", dict(vocab_size=100, emb_dim=32, num_heads=2, num_encoder_layers=2,
                         head_dim=16, mlp_dim=64, mlp_activations=("gelu", "linear"),
                         logits_via_embedding=False)),
    ("t5_small.gin", dict(vocab_size=32128, emb_dim=512, num_heads=8, num_encoder_layers=6,
                          num_decoder_layers=6, head_dim=64, mlp_dim=2048,
                          mlp_activations=("relu",), logits_via_embedding=True)),
    ("t5_base.gin", dict(vocab_size=32128, emb_dim=768, num_heads=12, num_decoder_layers=12,
                         mlp_dim=3072, logits_via_embedding=True, dropout_rate=0.1)),
    ("t5_1_1_base.gin", dict(emb_dim=768, num_heads=12, num_encoder_layers=12, mlp_dim=2048,
                             mlp_activations=("gelu", "linear"), logits_via_embedding=False)),
    ("t5_1_1_large.gin", dict(emb_dim=1024, num_heads=16, num_encoder_layers=24,
                              num_decoder_layers=24, head_dim=64, mlp_dim=2816,
                              mlp_activations=("gelu", "linear"), logits_via_embedding=False)),
])
def test_gin_model_files(gin_file, expected):
  bindings = ["VOCAB_SIZE = 100"] if gin_file == "t5_tiny.gin" else []
  cfg = _gin_config(f"gin/models/{gin_file}", bindings)
  assert isinstance(cfg, t5.T5Config)
  for field, value in expected.items():
    assert getattr(cfg, field) == value, field


def test_gin_tiny_requires_vocab_size_and_builds_a_model():
  with pytest.raises(ValueError, match="VOCAB_SIZE"):
    _gin_config("gin/models/t5_tiny.gin")
  cfg = _gin_config("gin/models/t5_tiny.gin", ["VOCAB_SIZE = 64", "DROPOUT_RATE = 0.0"])
  assert _logits(t5.Transformer(cfg), init_params(cfg), ENCODER_TOKENS,
                 DECODER_TOKENS).shape == (2, 5, 64)
