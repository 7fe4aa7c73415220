"""sessrec's training side: the data stage (`training.data`), the model and its training.

Moved modules keep their old names for pickles: a DATA folder's `workflow/workflow.pkl`
names the workflow's op classes and functions by module path, and folders prepared
before the data stage moved into `training/data/` (issue 16) say
`training.workflow_ops.MinLength` (or, before that module existed,
`training.workflow.MinLength`). `MOVED` maps each old name to the module that holds
those objects now; importing an old name gives that very module (the same object in
`sys.modules` under both names), so such a workflow unpickles, verifies and exports
as before. Workflows prepared now pickle the new names. Project code imports the new
names only (tests/training/test_moved.py checks it); nothing is imported until an old name is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old module name -> where it lives now (only names that pickled workflows reference)
MOVED = {
    "training.workflow_ops": "training.data.workflow_ops",
    "training.workflow": "training.data.workflow",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: an old name in MOVED loads as the new module itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def exec_module(self, module) -> None:
        # Replace the placeholder: the import system returns what sys.modules holds after
        # exec_module, so the old name and the new one are one module object.
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


# First in line: an old name must give the moved module even where another copy of the
# package (an older checkout, an editable install elsewhere) still has a file of that name.
if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
