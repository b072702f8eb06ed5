#!/usr/bin/env python3
"""Digest every output file of a run, to show a change left the outputs as they were.

    python scripts/digest_outputs.py DIR > before.json      # e.g. DIR of `run.py main --out DIR`
    ... change the code, run again ...
    python scripts/digest_outputs.py DIR > after.json
    python scripts/digest_outputs.py --compare before.json after.json

Each file under DIR gets two digests: ``bytes`` (sha256 of the file as written) and
``lines`` (sha256 of its lines sorted, so a change of line order alone shows as
``bytes`` differing with ``lines`` equal). What differs between two runs of the same
code is left out or normalised: timings in ``summary.json`` files (``seconds``,
``events_per_sec``) and paths (DIR itself, wherever an output names it); archive files are named and stamped with a run id
made of the time, so an archive file is digested by its decoded events and its
header metadata without the run id, under its name with the run id replaced.
Generated inputs (``DIR/input``) are digested too (same seed, same bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
from typing import Any, Dict

_RUN_ID = re.compile(r'events-(.+?)-(\d{4})\.(avro|parquet)$')
_VOLATILE = ('seconds', 'events_per_sec', 'paths', 'outputs_paths')


def _strip(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {k: _strip(v) for k, v in obj.items() if k not in _VOLATILE and k != 'outputs'
            or (k == 'outputs' and not all(isinstance(v, str) for v in obj[k].values()))}
  if isinstance(obj, list):
    return [_strip(v) for v in obj]
  if isinstance(obj, str) and obj.startswith('/'):
    return os.path.basename(obj)
  return obj


def _archive_digest(path: str) -> Dict[str, str]:
  """Decoded events and header metadata (no run id) of one archive file."""
  if path.endswith('.avro'):
    import fastavro
    with open(path, 'rb') as f:
      reader = fastavro.reader(f)
      meta = {k: v for k, v in reader.metadata.items()
              if k not in ('sourcebeam.run_id', 'avro.schema', 'avro.sync')}
      schema = json.loads(reader.metadata.get('avro.schema', 'null'))
      events = list(reader)
  else:
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()
            if k != b'sourcebeam.run_id'}
    schema = None
    events = table.to_pylist()
  blob = json.dumps({'meta': meta, 'schema': schema, 'events': events}, sort_keys=True,
                    default=repr).encode()
  h = hashlib.sha256(blob).hexdigest()
  return {'bytes': h, 'lines': h, 'events': len(events)}


def digest_dir(root: str) -> Dict[str, Dict[str, Any]]:
  out: Dict[str, Dict[str, Any]] = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      rel = os.path.relpath(path, root)
      m = _RUN_ID.search(name)
      if m and '/hour=' in '/' + rel.replace(os.sep, '/'):
        out[_RUN_ID.sub(lambda m: f'events-RUN-{m.group(2)}.{m.group(3)}', rel)] = \
            _archive_digest(path)
        continue
      with open(path, 'rb') as f:
        data = f.read()
      # The run's own folder appears in some outputs (dead letters name their source file).
      data = data.replace(os.path.abspath(root).encode(), b'DIR')
      if name == 'summary.json' or name.startswith('_counts'):
        try:
          data = json.dumps(_strip(json.loads(data)), sort_keys=True).encode()
        except ValueError:
          pass
      lines = sorted(data.split(b'\n'))
      out[rel] = {'bytes': hashlib.sha256(data).hexdigest(),
                  'lines': hashlib.sha256(b'\n'.join(lines)).hexdigest(),
                  'size': len(data)}
  return out


def compare(a: Dict[str, Dict[str, Any]], b: Dict[str, Dict[str, Any]]) -> int:
  bad = 0
  for name in sorted(set(a) | set(b)):
    if name not in a or name not in b:
      print(f'ONLY IN {"before" if name in a else "after"}: {name}')
      bad += 1
    elif a[name]['bytes'] != b[name]['bytes']:
      same_lines = a[name]['lines'] == b[name]['lines']
      print(f'{"LINE ORDER" if same_lines else "DIFFERS"}: {name}')
      bad += 0 if same_lines else 1
  print(f'{len(set(a) | set(b))} files compared: {bad} differ' +
        ('' if bad else ' (all equal)'))
  return 1 if bad else 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('dir', nargs='?')
  parser.add_argument('--compare', nargs=2, metavar=('BEFORE', 'AFTER'))
  args = parser.parse_args(argv)
  if args.compare:
    with open(args.compare[0]) as f, open(args.compare[1]) as g:
      return compare(json.load(f), json.load(g))
  if not args.dir:
    parser.error('give DIR or --compare BEFORE AFTER')
  json.dump(digest_dir(args.dir), sys.stdout, indent=1, sort_keys=True)
  print()
  return 0


if __name__ == '__main__':
  sys.exit(main())
