"""Prints one of the README's two set-up commands, the fenced bash blocks of its top (before the first `## `):
`main`, the first, or `tests`, the second.

    python3 .ci/readme_commands.py main|tests [README]

.ci/run runs what this prints, so CI runs what a new user copies from the README and fails where they would.
Standard library only: it runs before anything is installed.
"""

import re
import sys
from pathlib import Path

NAMES = ("main", "tests")
_BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def commands(readme: str, source: str = "README.md") -> dict[str, str]:
    """{'main': ..., 'tests': ...}: the bash blocks of `readme`'s top without their comment lines."""
    top = re.split(r"^## ", readme, maxsplit=1, flags=re.MULTILINE)[0]
    blocks = [
        "\n".join(line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#"))
        for block in _BASH_BLOCK.findall(top)
    ]
    if len(blocks) != 2 or not all(blocks):
        raise ValueError(
            f"{source}: expected two fenced bash blocks before the first '## ' heading, each with a command: "
            f"the main job, then the tests; found {len(blocks)} ({sum(map(bool, blocks))} with a command)"
        )
    main, tests = blocks
    # CI appends its quick overrides to the main job, so it must end with the trainer.
    if not re.search(r"-m metastone_jax\.train\s*$", main):
        raise ValueError(f"{source}: the first bash block must end with `-m metastone_jax.train`, got: {main}")
    return dict(zip(NAMES, blocks))


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] not in NAMES:
        print(f"usage: python3 .ci/readme_commands.py {'|'.join(NAMES)} [README]", file=sys.stderr)
        return 2
    readme = Path(argv[1] if len(argv) == 2 else Path(__file__).parents[1] / "README.md")
    try:
        print(commands(readme.read_text(), str(readme))[argv[0]])
    except (OSError, ValueError) as error:
        print(f"readme_commands: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
