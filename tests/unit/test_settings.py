"""Every knob of the service is documented where users look for it."""
import re
from pathlib import Path

from app.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_table_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `(HALO_[A-Z_]+)` \|\s*`?([^|`]*?)`?\s*\|", README.read_text(), re.MULTILINE))
    for name, field in Settings.model_fields.items():
        variable = f"HALO_{name.upper()}"
        assert variable in rows, f"{variable} is not in README's settings table"
        default = field.default
        if default is not None:
            shown = str(default).lower() if isinstance(default, bool) else str(default)
            assert rows[variable] in (shown, f"{default:g}" if isinstance(default, float) else shown), variable
