"""Where the time of one train step goes, by part of the network and by op.

  python -m benchmarks.profile --model gunn15 --batch_size 64

Compiles the step as `benchmarks/run.py` does, runs `--warmup` steps, traces
`--steps` more with `jax.profiler` and prints two markdown tables for the
traced step with the most recorded operation time (the tracer can miss the
first or last milliseconds of a trace): milliseconds by part of the network
(stem, each stage's transition and GUNN layer, final transition, classifier;
`other` is the loss and the optimiser) forward and backward, and the `--top`
compiled operations that took longest, with their shape and source. An
operation's time is summed over its executions in that step (a GUNN layer's
scan body runs once per segment).

XLA:CPU records executed operations as trace events only with its
`xla_cpu_enable_xprof_traceme` option, which this script sets for the
compiled step; it was written for and tested on CPU. On other backends the
events of the device planes are counted under their own names. Keep the raw
trace for TensorBoard or XProf with `--trace_dir`.
"""

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

import jax

from benchmarks import run

_PART = re.compile(
  r'/(stem|stage\d+_transition|stage\d+_gunn|final_transition|classifier)[/_]'
)
_TRACE_OPTIONS = {'xla_cpu_enable_xprof_traceme': True}
_STEP = 'train_step'  # The annotation of each traced step.


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (result shape, op_name) from a module's HLO text."""
  found = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ', line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      shape = match.group(2)
      found[match.group(1)] = (
        'tuple' if shape.startswith('(') else shape,
        op_name.group(1) if op_name else '',
      )
  return found


def op_events(
  profile: jax.profiler.ProfileData,
) -> tuple[list[tuple[str, int, int]], list[tuple[int, int]]]:
  """Executed XLA operations and annotated steps of a trace.

  Returns:
    (operations, steps): every executed operation as (name, start ns,
    duration ns), and every `_STEP` annotation as (start ns, end ns).
  """
  events, steps = [], []
  for plane in profile.planes:
    on_device = plane.name.startswith('/device:')
    for line in plane.lines:
      # XLA:CPU runs operations on its Eigen pool and, at times, on the
      # client thread that launched the step (tf_XLAPjRtCpuClient).
      if on_device or line.name.startswith('tf_XLA'):
        events += [
          (event.name, event.start_ns, event.duration_ns)
          for event in line.events
          # Runtime scopes (thread pools, executors) and completion marks.
          if '::' not in event.name and not event.name.startswith('end: ')
        ]
      else:
        steps += [
          (event.start_ns, event.start_ns + event.duration_ns)
          for event in line.events
          if event.name == _STEP
        ]
  return events, steps


def fullest_step(events, steps) -> list[tuple[str, int]]:
  """(name, duration ns) of the operations of the step with the most time.

  Operations count for the step their start falls in; with no annotated
  step, all of them count.
  """
  if not steps:
    return [(name, duration) for name, _, duration in events]
  per_step = [
    [(name, duration) for name, start, duration in events if lo <= start <= hi]
    for lo, hi in steps
  ]
  return max(per_step, key=lambda ops: sum(d for _, d in ops))


def network_part(op_name: str) -> tuple[str, str]:
  """('stage1_gunn', 'backward') etc. from an HLO op_name."""
  match = _PART.search(op_name)
  direction = 'backward' if 'transpose(' in op_name else 'forward'
  return (match.group(1) if match else 'other'), direction


def _part_order(part):
  stage = re.match(r'stage(\d+)_(transition|gunn)', part)
  if stage:
    return (1, int(stage.group(1)), stage.group(2) == 'gunn')
  return ({'stem': 0, 'final_transition': 2, 'classifier': 3}.get(part, 4),)


def summarise(events, instructions) -> dict:
  """Milliseconds by (part, direction) and by operation."""
  parts = collections.Counter()
  ops = collections.defaultdict(lambda: [0, 0.0])
  for name, nanoseconds in events:
    shape, op_name = instructions.get(name, ('?', ''))
    parts[network_part(op_name)] += nanoseconds / 1e6
    ops[name][0] += 1
    ops[name][1] += nanoseconds / 1e6
  top = sorted(ops.items(), key=lambda item: -item[1][1])
  return {
    'parts': dict(parts),
    'ops': [
      (name, count, ms, *instructions.get(name, ('?', '')))
      for name, (count, ms) in top
    ],
  }


def _source(op_name):
  short = re.sub(
    r'^jit\([^)]*\)/(transpose\()?(jvp\()?(GUNNNet\)+/)?', '', op_name
  )
  short = short.replace('while/body/closed_call/', '')
  return short if len(short) <= 80 else '...' + short[-77:]


def markdown(summary, top: int) -> str:
  total = sum(summary['parts'].values())
  lines = [
    '| part | forward ms | backward ms | share |',
    '|---|---|---|---|',
  ]
  names = sorted({part for part, _ in summary['parts']}, key=_part_order)
  for part in names:
    forward = summary['parts'].get((part, 'forward'), 0.0)
    backward = summary['parts'].get((part, 'backward'), 0.0)
    share = 100 * (forward + backward) / total
    lines.append(f'| {part} | {forward:.0f} | {backward:.0f} | {share:.1f}% |')
  lines += [
    '',
    '| operation | runs | ms | share | pass | shape | source |',
    '|---|---|---|---|---|---|---|',
  ]
  for name, count, ms, shape, op_name in summary['ops'][:top]:
    lines.append(
      f'| {name} | {count} | {ms:.0f} | {100 * ms / total:.1f}% '
      f'| {network_part(op_name)[1]} | {shape} | {_source(op_name)} |'
    )
  return '\n'.join(lines)


def main(argv=None) -> dict:
  """Profiles one step; returns the step time and the summary."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--model', default='gunn15', help='A registered network, e.g. gunn15.'
  )
  parser.add_argument(
    '--variant',
    default='gunn',
    choices=run.VARIANTS,
    help='gunn (Algorithm 1), gunn_autodiff or sunn (the SUNN twin).',
  )
  parser.add_argument(
    '--dtype', default='float32', choices=run.DTYPES, help='Activations.'
  )
  parser.add_argument(
    '--batch_size', type=int, default=64, help='Global batch size.'
  )
  parser.add_argument(
    '--image_size', type=int, default=0, help='0: 32 CIFAR, 224 ImageNet.'
  )
  parser.add_argument(
    '--warmup', type=int, default=1, help='Untraced steps run first.'
  )
  parser.add_argument(
    '--steps',
    type=int,
    default=3,
    help='Traced steps; the tables show the one with the most recorded time.',
  )
  parser.add_argument(
    '--top', type=int, default=25, help='Operations in the second table.'
  )
  parser.add_argument('--trace_dir', default=None, help='Keep the trace here.')
  args = parser.parse_args(argv)
  try:
    name = run.network_name(args.model, args.variant)
  except ValueError as e:
    parser.error(str(e))
  image_size = run.image_size_of(name, args.image_size)
  compiled, state, batch, _ = run.compile_train_step(
    name,
    args.variant,
    args.dtype,
    args.batch_size,
    image_size,
    compiler_options=_TRACE_OPTIONS,
  )
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  step_ms = []
  with tempfile.TemporaryDirectory() as scratch:
    trace_dir = args.trace_dir or scratch
    jax.profiler.start_trace(trace_dir)
    for step in range(args.steps):
      with jax.profiler.StepTraceAnnotation(_STEP, step_num=step):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        step_ms.append(1000 * (time.perf_counter() - start))
    jax.profiler.stop_trace()
    path = max(
      glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True),
      key=os.path.getmtime,
    )
    events = fullest_step(*op_events(jax.profiler.ProfileData.from_file(path)))
  step_ms = statistics.median(step_ms)
  if not events:
    parser.exit(1, 'profile: the trace has no XLA operation events.\n')
  summary = summarise(events, hlo_instructions(compiled.as_text()))
  recorded_ms = sum(summary['parts'].values())
  if recorded_ms < step_ms / 2:
    print(
      f'profile: warning: the trace holds {recorded_ms:.0f} ms of operations '
      f'for a {step_ms:.0f} ms step, so the tables are incomplete; run the '
      'profile in a fresh process.',
      file=sys.stderr,
    )
  print(
    f'{name} {args.variant} {args.dtype}, batch {args.batch_size}, '
    f'{image_size}x{image_size}: step {step_ms:.0f} ms, operations '
    f'{recorded_ms:.0f} ms\n'
  )
  print(markdown(summary, args.top))
  return {'step_ms': step_ms, **summary}


if __name__ == '__main__':
  main()
