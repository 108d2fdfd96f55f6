"""The repository explains itself: its references resolve inside it."""

import os
import re

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Files outside the repository that earlier docstrings cited (spelled in
# pieces so that this file does not match itself).
OUTSIDE = re.compile(
  '|'.join(
    [
      r'\.\./' + 'shared',
      'FACTS' + r'\.md',
      'XLA_CPU' + '_NOTES',
      'gunn-' + 'paper',
    ]
  )
)
SKIPPED_DIRS = {'.git', '__pycache__', '.ruff_cache', '.pytest_cache'}


def repository_files():
  for root, dirs, files in os.walk(REPO_ROOT):
    dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and '.venv' not in d]
    for name in files:
      if name.endswith(('.py', '.md', '.ipynb', '.txt', '.toml', '.cfg')) or (
        name == 'run'
      ):
        yield os.path.join(root, name)


def read(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


def test_no_file_cites_a_path_outside_the_repository():
  offenders = [
    f'{os.path.relpath(path, REPO_ROOT)}: {match.group(0)}'
    for path in repository_files()
    for match in OUTSIDE.finditer(read(path))
  ]
  assert not offenders


def test_every_cited_repository_path_exists():
  """`docs/...`, `benchmarks/...` and friends named anywhere exist."""
  cited = re.compile(
    r'(?<![\w/.])((?:docs|benchmarks|configs|gunn_jax|tests|notebooks)/'
    r'[\w./-]+\.(?:md|py|ipynb|png))'
  )
  missing = sorted(
    {
      f'{os.path.relpath(path, REPO_ROOT)}: {name}'
      for path in repository_files()
      for name in cited.findall(read(path))
      if not os.path.exists(os.path.join(REPO_ROOT, name))
    }
  )
  assert not missing


# README.md and every docs page (the moved README sections among them).
PAGES = ['README.md'] + [
  os.path.join('docs', name)
  for name in sorted(os.listdir(os.path.join(REPO_ROOT, 'docs')))
  if name.endswith('.md')
]


def test_readme_links_every_docs_page():
  readme = read(os.path.join(REPO_ROOT, 'README.md'))
  unlinked = [page for page in PAGES[1:] if f']({page})' not in readme]
  assert not unlinked


@pytest.mark.parametrize('page', PAGES)
def test_relative_links_resolve(page):
  text = read(os.path.join(REPO_ROOT, page))
  for target in re.findall(r'\]\(([^)#\s]+)', text):
    if '://' in target:
      continue
    path = os.path.join(REPO_ROOT, os.path.dirname(page), target)
    assert os.path.exists(path), target


def anchors(text):
  """GitHub's anchors of a page's headings: lower case, `-` for spaces."""
  return {
    re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
    for heading in re.findall(r'^#+ (.*)$', text, re.M)
  }


@pytest.mark.parametrize('page', PAGES)
def test_link_anchors_name_a_heading(page):
  """`[...](#x)` and `[...](page.md#x)` lead to a heading of that page."""
  text = read(os.path.join(REPO_ROOT, page))
  for target, anchor in re.findall(r'\]\(([^)#\s]*)#([^)\s]+)\)', text):
    if '://' in target:
      continue
    if target:
      path = os.path.join(REPO_ROOT, os.path.dirname(page), target)
    else:
      path = os.path.join(REPO_ROOT, page)
    assert anchor in anchors(read(path)), f'{target}#{anchor}'
