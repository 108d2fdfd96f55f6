"""How much of a start the persistent compilation cache saves.

  python -m benchmarks.restart [--config=configs/quickstart.py] [--json F]

Runs `main.py` three times for 2 steps, each in a new workdir: without a
compilation cache, then twice with one fresh cache directory
(`config.compilation_cache_dir`, `gunn_jax/compile_cache.py`): the first
fills it (a run's first start), the second loads from it (a resumed run's
start). For each it prints the seconds from launch to the first training
step's log line and to the process's exit (which includes compiling and
running the evaluation step). `JAX_COMPILATION_CACHE_DIR` is removed from the
runs' environment, so that only the config decides.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_run(config: str, workdir: str, cache_dir: str) -> dict:
  """Runs main.py for 2 steps; seconds to the step-1 line and to the exit."""
  env = {
    key: value
    for key, value in os.environ.items()
    if key != 'JAX_COMPILATION_CACHE_DIR'
  }
  command = [
    sys.executable,
    'main.py',
    f'--config={config}',
    f'--workdir={workdir}',
    '--config.num_train_steps=2',
    '--config.log_every_steps=1',
    f'--config.compilation_cache_dir={cache_dir}',
  ]
  start = time.perf_counter()
  first_step = None
  with subprocess.Popen(
    command,
    cwd=REPO_ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  ) as process:
    output = []
    for line in process.stdout:
      output.append(line)
      if first_step is None and re.search(r' step +1/2 ', line):
        first_step = time.perf_counter() - start
  if process.returncode:
    raise SystemExit(f'{" ".join(command)} failed:\n{"".join(output)[-3000:]}')
  return {
    'to_first_step_s': round(first_step, 2),
    'to_exit_s': round(time.perf_counter() - start, 2),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--json', help='Also write the records here.')
  args = parser.parse_args()
  records = []
  with tempfile.TemporaryDirectory() as root:
    cache = os.path.join(root, 'cache')
    for name, cache_dir in (
      ('no cache', ''),
      ('first start, filling the cache', cache),
      ('second start, from the cache', cache),
    ):
      workdir = os.path.join(root, f'run{len(records)}')
      records.append(
        {'run': name, **timed_run(args.config, workdir, cache_dir)}
      )
  cold, warm = records[0], records[2]
  for key in ('to_first_step_s', 'to_exit_s'):
    print(f'{key}: ' + ', '.join(f'{r["run"]} {r[key]}' for r in records))
    print(f'  second start / no cache: {warm[key] / cold[key]:.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(records, f, indent=2)


if __name__ == '__main__':
  main()
