"""ds4jax.cli: Ctrl-C is never lost, even when it lands inside a gc callback."""

import subprocess
import sys
import textwrap

import pytest

# The first SIGINT arrives while a gc callback runs, where Python drops the KeyboardInterrupt
# ("Exception ignored in ..."): jax registers such a callback, so this happens in real runs.
_SCRIPT = textwrap.dedent("""
    import gc, os, signal, sys, threading, time
    from ds4jax import cli

    def main(argv):
      in_callback = threading.Event()
      def slow_callback(phase, info):
        if phase == "start" and not in_callback.is_set():
          in_callback.set()
          time.sleep(1.0)
      gc.callbacks.append(slow_callback)
      threading.Thread(target=lambda: (in_callback.wait(), time.sleep(0.2),
                                       os.kill(os.getpid(), signal.SIGINT))).start()
      gc.collect()
      gc.callbacks.remove(slow_callback)
      print("survived the first interrupt", file=sys.stderr, flush=True)
      deadline = time.monotonic() + 10
      while time.monotonic() < deadline:
        time.sleep(0.01)
      print("never interrupted", file=sys.stderr, flush=True)
      return 0

    cli.run(main)
""")


@pytest.mark.e2e
def test_ctrl_c_swallowed_by_a_gc_callback_is_delivered_again():
  p = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60)
  # The first one really was dropped (the gc callback returned), silently: no traceback.
  assert "survived the first interrupt" in p.stderr, p.stderr
  assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
  assert "never interrupted" not in p.stderr, p.stderr
  assert p.returncode == 130 and p.stderr.rstrip().endswith("interrupted"), p.stderr
