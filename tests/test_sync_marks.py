"""The no-sync rule as a test: every host read of a tensor in learnkit/ carries `# sync-ok: <reason>`.

A host read (`.item()`, `.cpu()`, ...) makes the CPU wait for the device: once per batch it stalls a GPU's queue.
The library reads in bulk, at epoch ends or on request, and marks each such read with why it is fine there. The
scanner parses every `.py` under `learnkit/` with `ast` and reports, as `file:line`, each of these not marked:
- calls of `.item()`, `.cpu()`, `.tolist()` and `.numpy()`;
- `torch.cuda.synchronize(...)`;
- `.nonzero(...)` and `torch.nonzero(...)` without `as_tuple=` (the size of the result is read back);
- `float(...)`, `int(...)` and `bool(...)` of what looks like a tensor expression: the argument contains a
  subscript (`x[0]`), a call into `torch.` or a call of a tensor method (`.sum()`, `.mean()`, `.norm()`, ... see
  TENSOR_METHODS).
Calls into host-only modules (`np.`, `math.`, `pd.`, ... see HOST_MODULES) are never flagged. This is a
heuristic: `float(loss)` of a bare name is not flagged (nothing in the source says `loss` is a tensor), and
`int(args[0])` of a list is (mark it, saying it is not a tensor). Printing a tensor and `if tensor:` are not
detected at all.
A mark is a trailing comment `# sync-ok: <reason>` on one of the lines the flagged call spans; a mark without a
reason (`# sync-ok` alone, or nothing after the colon) is reported too.
"""
import ast
import io
import re
import tokenize
from pathlib import Path

import learnkit

HOST_READ_METHODS = {'item', 'cpu', 'tolist', 'numpy'}
TENSOR_METHODS = {'sum', 'mean', 'nanmean', 'nansum', 'max', 'min', 'amax', 'amin', 'norm', 'std', 'var', 'prod',
                  'abs', 'sqrt', 'exp', 'log', 'argmax', 'argmin', 'any', 'all', 'count_nonzero', 'dot', 'median',
                  'quantile', 'float', 'double', 'long', 'int', 'half', 'to', 'detach', 'clamp', 'squeeze', 'reshape',
                  'view', 'flatten', 'isfinite', 'isnan'}
HOST_MODULES = {'np', 'numpy', 'math', 'pd', 'pandas', 'random', 'os', 'struct'}
MARK = re.compile(r'#\s*sync-ok\b(?P<colon>:?)(?P<reason>.*)$')


def _marks(source):
    "{line: reason or ''} of every `# sync-ok` comment in `source`."
    marks = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and (m := MARK.search(tok.string)):
            marks[tok.start[0]] = m['reason'].strip() if m['colon'] else ''
    return marks


def _module_of(call):
    "The name at the root of a call's `a.b.c(...)` chain, when the chain starts with a plain name."
    f = call.func
    while isinstance(f, ast.Attribute): f = f.value
    return f.id if isinstance(f, ast.Name) and isinstance(call.func, ast.Attribute) else None


def _looks_like_tensor(expr):
    for node in ast.walk(expr):
        if isinstance(node, ast.Subscript): return True
        if isinstance(node, ast.Call) and _module_of(node) not in HOST_MODULES and (
                _module_of(node) == 'torch' or (isinstance(node.func, ast.Attribute)
                                                and node.func.attr in TENSOR_METHODS)):
            return True
    return False


def _host_read(node):
    "What makes `node` (a Call) a host read, or None."
    f = node.func
    if _module_of(node) in HOST_MODULES: return None
    if isinstance(f, ast.Attribute):
        if f.attr in HOST_READ_METHODS: return f'.{f.attr}()'
        if f.attr == 'synchronize' and ast.unparse(f.value) == 'torch.cuda': return 'torch.cuda.synchronize()'
        if f.attr == 'nonzero' and not any(k.arg == 'as_tuple' for k in node.keywords):
            return '.nonzero() without as_tuple'
    if isinstance(f, ast.Name) and f.id in ('float', 'int', 'bool') and len(node.args) == 1:
        if _looks_like_tensor(node.args[0]): return f'{f.id}() of a tensor expression'
    return None


def scan_source(source, name):
    """The unmarked host reads in `source` (a file's text, reported as `name`), and the marks without a reason, as
    'name:line: what' strings."""
    marks = _marks(source)
    problems = [f'{name}:{line}: `# sync-ok` needs a reason: `# sync-ok: <why this read is fine here>`'
                for line, reason in marks.items() if not reason]
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or (what := _host_read(node)) is None: continue
        lines = range(node.lineno, node.end_lineno + 1)
        if not any(marks.get(line) for line in lines):
            problems.append(f'{name}:{node.lineno}: {what} not marked `# sync-ok: <reason>`')
    return sorted(problems, key=lambda p: int(p.split(':')[1]))


def test_every_host_read_in_learnkit_is_marked_with_a_reason():
    root = Path(learnkit.__file__).parent
    problems = [p for path in sorted(root.rglob('*.py'))
                for p in scan_source(path.read_text(), str(path.relative_to(root.parent)))]
    assert not problems, "host reads without `# sync-ok: <reason>`:\n" + '\n'.join(problems)


def test_the_scanner_reports_what_it_should_and_only_that():
    snippet = '''import torch
def f(x, lr, args):
    a = x.item()
    b = x.sum().item()  # sync-ok: once per epoch
    c = x.cpu()  # sync-ok
    d = x.tolist()  # sync-ok:
    e = float(x.norm())
    g = float(lr) + int(args.n)
    h = x.nonzero()
    i = x.nonzero(as_tuple=True)
    torch.cuda.synchronize()
    j = bool(torch.isfinite(x).all())  # sync-ok: the end of fit
    m = int(np.argmin(x.numpy()))  # sync-ok: a plot
    n = np.nonzero(lr)[0], int(np.prod(args.shape)), float(math.sqrt(lr))
    k = int(
        x[0])
    return float(
        x.max())  # sync-ok: marked on the call's last line
'''
    assert scan_source(snippet, 'snippet.py') == [
        'snippet.py:3: .item() not marked `# sync-ok: <reason>`',
        'snippet.py:5: `# sync-ok` needs a reason: `# sync-ok: <why this read is fine here>`',
        'snippet.py:5: .cpu() not marked `# sync-ok: <reason>`',
        'snippet.py:6: `# sync-ok` needs a reason: `# sync-ok: <why this read is fine here>`',
        'snippet.py:6: .tolist() not marked `# sync-ok: <reason>`',
        'snippet.py:7: float() of a tensor expression not marked `# sync-ok: <reason>`',
        'snippet.py:9: .nonzero() without as_tuple not marked `# sync-ok: <reason>`',
        'snippet.py:11: torch.cuda.synchronize() not marked `# sync-ok: <reason>`',
        'snippet.py:15: int() of a tensor expression not marked `# sync-ok: <reason>`']
