"""The documentation keeps up with the code: README.md stays short, the man
pages render without a warning, every relative link (and its #anchor) leads
somewhere inside the repository, and every dwsfs option, status field and
dwsctl command the code has is documented."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
MAN_PAGES = ["dwsfs.1", "dwsctl.1"]
README_MAX = 15000


def text(path):
    return path.read_text(encoding="utf-8")


def markdown_files():
    return [REPO / "README.md"] + sorted(DOCS.glob("*.md"))


def without_code(md):
    """Markdown without fenced code blocks and inline code spans."""
    md = re.sub(r"^```.*?^```", "", md, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", md)


def slug(heading):
    """GitHub's anchor for a heading."""
    h = heading.strip().lower().replace("`", "")
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def anchors(md):
    md = re.sub(r"^```.*?^```", "", md, flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", md, flags=re.M)}


def links(md):
    return re.findall(r"\]\(([^)\s]+)\)", without_code(md))


def test_readme_is_short():
    n = len(text(REPO / "README.md"))
    assert n <= README_MAX, f"README.md has {n} characters, more than {README_MAX}: move reference to docs/"


@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_renders_without_warnings(page):
    groff = shutil.which("groff")
    assert groff, "groff not found: install groff-base (listed in .ci/run)"
    p = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(DOCS / page)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    man = shutil.which("man")
    if man:  # man-db's own run of the page, warnings on
        p = subprocess.run([man, "--warnings", "-l", str(DOCS / page)], capture_output=True, text=True,
                           timeout=60, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        assert p.returncode == 0 and p.stderr == "", p.stderr
        assert p.stdout.strip(), "man printed nothing"


def test_meson_installs_the_man_pages():
    build = text(REPO / "meson.build")
    m = re.search(r"install_man\(([^)]*)\)", build)
    assert m, "meson.build has no install_man"
    for page in MAN_PAGES:
        assert f"'docs/{page}'" in m.group(1), page


def test_relative_links_lead_to_files_and_headings():
    bad = []
    for md in markdown_files():
        for link in links(text(md)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, mailto:, ...
                bad.append(f"{md.relative_to(REPO)}: {link}: links stay inside the repository")
                continue
            target, _, frag = link.partition("#")
            dest = (md.parent / target).resolve() if target else md
            if REPO not in dest.parents and dest != REPO:
                bad.append(f"{md.relative_to(REPO)}: {link}: outside the repository")
            elif not dest.exists():
                bad.append(f"{md.relative_to(REPO)}: {link}: no such file")
            elif frag and dest.suffix == ".md" and frag not in anchors(text(dest)):
                bad.append(f"{md.relative_to(REPO)}: {link}: no heading #{frag} in {dest.name}")
    assert not bad, "\n".join(bad)


def test_docs_named_in_the_code_exist():
    """A `docs/NAME.md` the sources point to (help texts, comments) exists."""
    named = set()
    for src in list((REPO / "src").glob("*.[ch]")) + list((REPO / "fs").glob("*.[ch]")):
        named |= set(re.findall(r"docs/[\w.-]+\.md", text(src)))
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, missing


def dwsfs_options():
    src = text(REPO / "fs" / "options.c")
    defs = re.search(r"static const struct optdef defs\[O_COUNT\] = \{(.*?)\n\};", src, flags=re.S)
    assert defs, "fs/options.c: the defs table was not found"
    names = re.findall(r'\[O_\w+\]\s*=\s*\{"(\w+)"', defs.group(1))
    assert len(names) >= 20, names
    return names


def test_every_option_is_documented():
    md = text(DOCS / "options.md")
    man = text(DOCS / "dwsfs.1")
    in_table = set(re.findall(r"^\|\s*`(\w+)`", md, flags=re.M))
    missing_md = [o for o in dwsfs_options() if o not in in_table]
    missing_man = [o for o in dwsfs_options() if not re.search(rf"(?<![\w\\]){o}(?!\w)", man)]
    assert not missing_md, f"not in docs/options.md's table: {missing_md}"
    assert not missing_man, f"not in docs/dwsfs.1: {missing_man}"


def status_fields():
    core = re.findall(r'put\(j,\s*"(\w+)"', text(REPO / "src" / "status.c"))
    fsops = text(REPO / "fs" / "fsops.c")
    extra = re.search(r"dws_status_field extra\[\] = \{(.*?)\};", fsops, flags=re.S)
    assert extra, "fs/fsops.c: the status's extra fields were not found"
    fields = core + re.findall(r'\{"(\w+)",', extra.group(1))
    assert len(fields) >= 30, fields
    return fields


def test_every_status_field_is_documented():
    documented = set(re.findall(r"^\|\s*`(\w+)`", text(DOCS / "status.md"), flags=re.M))
    missing = [f for f in status_fields() if f not in documented]
    assert not missing, f"not in docs/status.md's tables: {missing}"


def test_every_dwsctl_command_is_documented():
    src = text(REPO / "fs" / "dwsctl.c")
    cmds = re.findall(r'if \(!strcmp\(cmd, "(\w+)"\)\)', src)
    assert len(cmds) >= 6, cmds
    md = text(DOCS / "dwsctl.md")
    man = text(DOCS / "dwsctl.1")
    missing_md = [c for c in cmds if not re.search(rf"^## {c}\s*$", md, flags=re.M)]
    missing_man = [c for c in cmds if not re.search(rf"^\.B(?: dwsctl)? {c}\s*$", man, flags=re.M)]
    assert not missing_md, f"no section in docs/dwsctl.md: {missing_md}"
    assert not missing_man, f"not in docs/dwsctl.1: {missing_man}"


def test_every_source_file_is_in_the_architecture():
    arch = text(DOCS / "architecture.md")
    files = sorted(f"{d}/{p.name}" for d in ("src", "fs") for p in (REPO / d).glob("*.c"))
    missing = [f for f in files if f"`{f}`" not in arch and not re.search(rf"`{re.escape(f)}`", arch)
               and f.split("/")[1] not in arch]
    assert not missing, f"not in docs/architecture.md's file table: {missing}"
