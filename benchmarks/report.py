"""The device check's table and closing comparisons (`accelerator.py`)."""

COLUMNS = (
  'kind',
  'model',
  'options',
  'dtype',
  'batch',
  'image',
  'step ms',
  'blocked ms',
  'host ms',
  'pace',
  'images/s',
  'compile s',
  'memory MiB',
  'GFLOP/image',
  'TFLOP/s',
  'MFU',
  'test accuracy',
)
HEADER = '| ' + ' | '.join(COLUMNS) + ' |\n' + '|---' * len(COLUMNS) + '|'


def options_text(options) -> str:
  return ', '.join(f'{k}={v}' for k, v in (options or {}).items()) or '-'


def _cell(value, fmt: str = '.1f') -> str:
  return '-' if value is None else format(value, fmt)


def row(r: dict) -> str:
  """One record as a line of the markdown table (`HEADER`)."""
  first = (
    f'| {r["kind"]} | {r["model"]} | {options_text(r.get("options"))} '
    f'| {r["dtype"]} | {r["batch_size"]} | {r["image_size"]} '
  )
  if r.get('skipped') or r.get('error'):
    what = 'skipped' if r.get('skipped') else 'error'
    # One line, however long the error: the record keeps all of it.
    reason = ' '.join((r.get('reason') or r['error']).split())[:300]
    reason = reason.replace('|', '/')
    return first + f'| {what}: {reason} |' + '|' * (len(COLUMNS) - 7)
  memory = r.get('memory_bytes')
  forward = r.get('forward_flops_per_image')
  return first + (
    f'| {r["step_ms"]:.2f} | {_cell(r.get("blocked_step_ms"), ".2f")} '
    f'| {_cell(r.get("host_ms"), ".2f")} | {r.get("pace") or "-"} '
    f'| {r["images_per_s"]:.1f} | {_cell(r.get("compile_s"))} '
    f'| {_cell(None if memory is None else memory / 2**20, ".0f")} '
    f'| {_cell(None if forward is None else forward / 1e9, ".3g")} '
    f'| {_cell(r.get("achieved_tflops"), ".3g")} '
    f'| {_cell(r.get("mfu"), ".1%")} '
    f'| {_cell(r.get("test_accuracy"), ".2%")} |'
  )


def table(records) -> str:
  """A markdown table of the records."""
  return '\n'.join([HEADER, *map(row, records)])


def record_key(record: dict) -> tuple:
  """What a record measured: kind, model, dtype, batch, image, options."""
  return (
    record['kind'],
    record['model'],
    record['dtype'],
    record['batch_size'],
    record['image_size'],
    options_text(record.get('options')),
  )


def comparisons(records) -> list[str]:
  """GUNN/SUNN step-time ratios, each option against its default, and the
  training loop's images/s against its bare step's."""
  measured = {record_key(r): r for r in records if 'step_ms' in r}
  lines = []
  for (kind, model, dtype, batch, image, options), r in measured.items():
    case = f'{model} {dtype} batch {batch}'
    if kind == 'loop':
      bare = measured.get(('train_step', model, dtype, batch, image, options))
      lines.append(
        f'{case}, train_and_evaluate with {options}: '
        f'{r["images_per_s"]:.1f} images/s'
        + (
          ''
          if bare is None
          else f', the bare step {bare["images_per_s"]:.1f} images/s: '
          f'{r["images_per_s"] / bare["images_per_s"]:.2f}x'
        )
      )
    elif options != '-':
      default = measured.get((kind, model, dtype, batch, image, '-'))
      if default:
        lines.append(
          f'{case}, {options} against the default: '
          f'{r["step_ms"] / default["step_ms"]:.2f}x the step time'
        )
    elif kind == 'train_step' and model.startswith('gunn'):
      twin = model.replace('gunn', 'sunn', 1)
      sunn = measured.get((kind, twin, dtype, batch, image, '-'))
      if sunn:
        lines.append(
          f'{model}/{twin} step time, {dtype}, batch {batch}: '
          f'{r["step_ms"] / sunn["step_ms"]:.2f}'
        )
  return lines
