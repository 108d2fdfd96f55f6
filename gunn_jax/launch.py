"""Runs N JAX processes of one program on this machine, as a pod's hosts would.

    python -m gunn_jax.launch --num_processes=2 --devices_per_process=2 -- \\
      main.py --config=configs/quickstart.py --workdir=runs/mh

Each process gets `JAX_COORDINATOR_ADDRESS` (localhost and a free port),
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (read by `gunn_jax.distributed`),
`JAX_PLATFORMS=cpu` unless set, and `devices_per_process` CPU devices. Their
output is forwarded line by line, prefixed with `[process i] `.

The run fails as a whole: when one process exits with a non-zero status the
launcher kills the others and exits with that status (1 for a signal).
SIGINT/SIGTERM are passed on as SIGTERM, so the processes can save a
checkpoint (JAX's preemption service) and stop together.
"""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading

from absl import app, flags

_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', 2, 'Number of processes to start.', lower_bound=1
)
_DEVICES = flags.DEFINE_integer(
  'devices_per_process', 1, 'CPU devices of each process.', lower_bound=1
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _environment(index: int, count: int, port: int, devices: int) -> dict:
  env = dict(os.environ)
  env.update(
    JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
    JAX_NUM_PROCESSES=str(count),
    JAX_PROCESS_ID=str(index),
    PYTHONUNBUFFERED='1',
  )
  env.setdefault('JAX_PLATFORMS', 'cpu')
  env['XLA_FLAGS'] = ' '.join(
    [
      env.get('XLA_FLAGS', ''),
      f'--xla_force_host_platform_device_count={devices}',
    ]
  ).strip()
  return env


def _forward(index: int, stream, lock: threading.Lock) -> None:
  for line in stream:
    with lock:
      sys.stdout.write(f'[process {index}] {line}')
      sys.stdout.flush()


def launch(command: list[str], num_processes: int, devices: int) -> int:
  """Runs `python command...` N times; returns the run's exit status."""
  port = _free_port()
  lock = threading.Lock()
  procs, threads = [], []
  for index in range(num_processes):
    proc = subprocess.Popen(
      [sys.executable, *command],
      env=_environment(index, num_processes, port, devices),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    thread = threading.Thread(target=_forward, args=(index, proc.stdout, lock))
    thread.start()
    procs.append(proc)
    threads.append(thread)

  def stop(signum, frame):
    del signum, frame
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)

  # Exits in the order they happen, so that the first failure is named even
  # when the others fail right after it (their peer is gone).
  exits = queue.Queue()
  for index, proc in enumerate(procs):
    threading.Thread(
      target=lambda index, proc: exits.put((index, proc.wait())),
      args=(index, proc),
      daemon=True,
    ).start()
  previous = [signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)]
  try:
    failed = None
    for _ in procs:
      while True:
        try:  # A timeout, so that signal handlers run meanwhile.
          index, code = exits.get(timeout=0.2)
          break
        except queue.Empty:
          pass
      if code:
        failed = (index, code)
        break
    if failed:
      with lock:
        print(
          f'gunn_jax.launch: process {failed[0]} failed with exit status '
          f'{failed[1]}; stopping the other processes.',
          file=sys.stderr,
          flush=True,
        )
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
    for proc in procs:
      proc.wait()
  finally:
    for s, handler in zip((signal.SIGINT, signal.SIGTERM), previous):
      signal.signal(s, handler)
  for thread in threads:
    thread.join()
  if not failed:
    return 0
  return failed[1] if failed[1] > 0 else 1


def main(argv):
  command = argv[1:]
  if not command:
    raise app.UsageError('Give the program after --, e.g. -- main.py ...')
  sys.exit(launch(command, _NUM_PROCESSES.value, _DEVICES.value))


if __name__ == '__main__':
  app.run(main)
