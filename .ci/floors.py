"""Print pyproject.toml's lower bounds as pip constraints, one `name==version` a line: the
dependencies' and the test extra's. The floor environment in .ci/run installs exactly these, so
every lower bound the project declares is one the suite has passed on. A requirement without a
lower bound is an error: it would leave its floor untested."""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
missing = []
for requirement in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
    floor = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*[^;]*?>=\s*([^,;\s]+)", requirement)
    if floor is None:
        missing.append(requirement)
    else:
        print(f"{floor[1]}=={floor[2]}")
if missing:
    sys.exit(f"error: pyproject.toml requirements without a lower bound: {', '.join(missing)}")
