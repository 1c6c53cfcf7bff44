"""XLA flags of the test session and of the command-line runs the tests start.

The tests' models are tiny, so their time goes to compiling: LLVM optimisation level 0 halves
it (e.g. four indexer loss tests: 106 s -> 47 s on 2 cores). What runs outside the tests keeps
XLA's defaults.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def flags(num_devices: int = 1) -> str:
  """XLA_FLAGS for `num_devices` simulated CPU devices."""
  if num_devices == 1:
    return FAST_COMPILE
  return f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}"


def env(num_devices: int = 1) -> dict[str, str]:
  """This process's environment with `flags(num_devices)`, for a subprocess."""
  return dict(os.environ, XLA_FLAGS=flags(num_devices))
