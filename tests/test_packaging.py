"""Packaging: one list of Debian packages (scripts/install-deps) that every
script installs from and that holds what the build, the tests and the scripts
run; `meson install` stays under the prefix; the container image builds as the
README says and the Kubernetes example has what a FUSE DaemonSet needs."""
import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INSTALL_DEPS = REPO / "scripts" / "install-deps"
MODES = ["build", "demo", "test", "ci"]
DWSFS = os.environ.get("DWSFS", str(REPO / "build" / "dwsfs"))


def listed(mode):
    p = subprocess.run(["bash", str(INSTALL_DEPS), f"--{mode}", "--list"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def shell_words(line):
    return [w for w in re.split(r"\s+", line.strip()) if w]


def apt_packages(cmd):
    """The package names of the `apt-get install ...` in a command line."""
    [part] = [c for c in cmd.split("&&") if "apt-get install" in c]
    words = shell_words(part)
    return [w for w in words[words.index("install") + 1:] if not w.startswith("-")]


def joined_lines(text):
    """Lines with backslash continuations joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    return out


# ---- A: one package list -------------------------------------------------

def test_each_mode_takes_the_one_before():
    lists = {m: listed(m) for m in MODES}
    for m in MODES:
        assert len(set(lists[m])) == len(lists[m]), f"--{m} names a package twice: {lists[m]}"
    for a, b in zip(MODES, MODES[1:]):
        assert set(lists[a]) < set(lists[b]), f"--{b} lacks some of --{a}: {set(lists[a]) - set(lists[b])}"


def repo_shell_scripts():
    out = []
    for top in (".ci", "scripts", "tests", "recipes", "mount-helpers"):
        for path in sorted((REPO / top).rglob("*")):
            if path.is_file() and not path.is_symlink() and not {"__pycache__", "corpus-run"} & set(path.parts):
                if re.match(rb"#!\s*(/usr/bin/env\s+)?(/bin/)?(ba)?sh\b", path.read_bytes()[:64]):
                    out.append(path)
    return out


def test_scripts_install_only_through_install_deps():
    """tests/run, .ci/run and the demo install with install-deps; no other
    script runs apt-get or npm install of its own."""
    want = {"tests/run": "--test", ".ci/run": "--ci", "scripts/demo": "--demo"}
    for script, mode in want.items():
        text = (REPO / script).read_text()
        assert f"bash scripts/install-deps {mode}\n" in text, f"{script} does not run install-deps {mode}"
    ci = (REPO / ".ci/run").read_text()
    assert "\nbash tests/run" in ci, ".ci/run does not run tests/run"
    run = (REPO / "tests/run").read_text()
    assert run.index("install-deps") < run.index("meson setup"), "tests/run builds before installing"
    scripts = repo_shell_scripts()
    assert REPO / "tests/run" in scripts and REPO / "scripts/install-deps" in scripts
    for path in scripts:
        if path == INSTALL_DEPS:
            continue
        for line in joined_lines(path.read_text()):
            assert not re.search(r"\bapt(-get)?\s+install|\bnpm\s+(install|i)\b", line), f"{path}: {line}"


def test_readme_and_dockerfile_name_the_build_list():
    """The README's apt-get line and the image's builder stage: exactly --build."""
    build = sorted(listed("build"))
    readme = readme_install_block()
    apt = [l for l in joined_lines(readme) if "apt-get install" in l]
    assert len(apt) == 1, apt
    assert sorted(apt_packages(apt[0])) == build
    stage = dockerfile_stages()[0]
    apt = [c for c in stage["run"] if "apt-get install" in c]
    assert len(apt) == 1, apt
    assert sorted(apt_packages(apt[0])) == build


# Which Debian package provides what a script runs: the owner of the file
# (dpkg -S), accepted when it is listed, a dependency of a listed package, or
# on every Debian (Essential or Priority: required, and what they depend on).

@lru_cache(maxsize=None)
def dpkg_db():
    fmt = "${Package}\t${db:Status-Abbrev}\t${Provides}\t${Depends}, ${Pre-Depends}\t${Priority}\t${Essential}\n"
    out = subprocess.run(["dpkg-query", "-W", "-f", fmt], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    pkgs, providers = {}, {}
    for line in out.splitlines():
        name, status, provides, deps, prio, ess = line.split("\t")
        if not status.startswith("ii"):
            continue
        groups = []
        for group in deps.split(","):
            alts = [re.match(r"\s*([^\s:(]+)", a) for a in group.split("|")]
            alts = [m.group(1) for m in alts if m]
            if alts:
                groups.append(alts)
        pkgs[name] = (groups, prio == "required" or ess == "yes")
        for pv in provides.split(","):
            m = re.match(r"\s*([^\s:(]+)", pv)
            if m:
                providers.setdefault(m.group(1), set()).add(name)
    return pkgs, providers


def closure(names):
    pkgs, providers = dpkg_db()
    seen, todo = set(), list(names)
    while todo:
        n = todo.pop()
        for real in ({n} if n in pkgs else set()) | providers.get(n, set()):
            if real not in seen:
                seen.add(real)
                todo.extend(a for group in pkgs[real][0] for a in group)
    return seen


def every_debian():
    return closure([n for n, (_, base) in dpkg_db()[0].items() if base])


def owners(paths):
    """{path: package} for the paths some package holds: one dpkg-query for
    all, each path tried as given, resolved, and in its merged-/usr spellings."""
    cands = {}
    for path in paths:
        p = Path(path)
        cands[path] = [str(p), os.path.realpath(p)]
        if p.parent.name in ("bin", "sbin"):
            cands[path] += [f"/usr/{p.parent.name}/{p.name}", f"/{p.parent.name}/{p.name}"]
    flat = sorted({c for cs in cands.values() for c in cs})
    out = subprocess.run(["dpkg-query", "-S", *flat], capture_output=True, text=True, timeout=120).stdout
    held = {}
    for line in out.splitlines():
        if not line.startswith("diversion"):
            pkgs, file = line.rsplit(": ", 1)
            held[file] = pkgs.split(", ")[0].split(":")[0]
    return {path: next((held[c] for c in cs if c in held), None) for path, cs in cands.items()}


def needed(uses, must_be_packaged=()):
    """{package: [why]} from [(why, path)]; paths in must_be_packaged must
    belong to a package (others, the repo's own or not installed, are left)."""
    found = owners([path for _, path in uses])
    need = {}
    for why, path in uses:
        assert found[path] or path not in must_be_packaged, f"{why}: {path} from no package"
        if found[path]:
            need.setdefault(found[path], []).append(why)
    return need


SHELL_WORDS = {"if", "then", "else", "elif", "fi", "while", "until", "do", "done", "!", "exec", "time"}


def shell_commands(path):
    """Commands a shell script starts: the first word at the start of a line
    and after | && || ; $( ( (not a $variable, not the repo's build/ or
    tests/), and the compilers named by CC= and CXX=."""
    names = set()
    for line in joined_lines(path.read_text()):
        names |= set(re.findall(r"\b(?:CC|CXX)=([\w+.-]+)", line))
        for part in re.split(r"\|\||&&|[|;(]|\$\(", line):
            words = [w for w in shell_words(part) if not re.match(r"^\w+=", w)]
            while words and words[0] in SHELL_WORDS:
                words = words[1:]
            if words and re.fullmatch(r"/?[a-z][\w./+-]*", words[0]) and not words[0].startswith(("build", "tests")):
                names.add(words[0])
    return names


def python_commands_and_modules(path):
    text = path.read_text()
    cmds = set(re.findall(r"(?:run|Popen|check_output|check_call|call)\(\s*\[\s*\"([^\"$]+)\"", text))
    cmds |= set(re.findall(r"\bcmd\s*=\s*\[\s*\"([^\"$]+)\"", text))
    cmds |= set(re.findall(r"shutil\.which\(\"([^\"]+)\"\)", text))
    mods = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
    local = {p.stem for p in path.parent.glob("*.py")} | {p.name for p in path.parent.iterdir() if p.is_dir()}
    return cmds, {m for m in mods - set(sys.stdlib_module_names) - local}


def files_for(mode):
    t = REPO / "tests"
    if mode == "demo":
        return [REPO / "scripts/demo", t / "gen_bucket.py", t / "dwsgen.py"]
    if mode == "test":
        return [REPO / "tests/run"] + sorted(t.glob("*.py"))
    bench = [p for p in sorted((t / "bench").iterdir()) if p.suffix in (".py", ".sh") or p.name == "run"]
    return [REPO / ".ci/run", REPO / ".ci/fuzz.sh"] + bench + sorted((t / "fuzz").glob("*.py"))


def owners_needed(mode):
    """{package: [why]} for what mode's files run and import."""
    uses, modules = [], []
    for f in files_for(mode):
        if f.suffix == ".py" or f.read_text().startswith("#!/usr/bin/python3"):
            cmds, mods = python_commands_and_modules(f)
            for m in mods:
                spec = importlib.util.find_spec(m)
                if spec and spec.origin and spec.origin.startswith("/usr/"):
                    uses.append((f"{f.name}: import {m}", spec.origin))
                    modules.append(spec.origin)
        else:
            cmds = shell_commands(f)
        for c in cmds:
            path = c if c.startswith("/") else shutil.which(c)
            if path and os.path.exists(path):
                uses.append((f"{f.name}: {c}", path))
    return needed(uses, modules)


def build_needs():
    """pkg-config files of meson.build's required dependencies, and the tools."""
    uses = []
    src = (REPO / "meson.build").read_text()
    for name, rest in re.findall(r"dependency\('([^']+)'([^)]*)\)", src):
        if name == "threads" or "required : false" in rest:
            continue
        pcdir = subprocess.run(["pkg-config", "--variable=pcfiledir", name], capture_output=True, text=True,
                               timeout=30).stdout.strip()
        uses.append((f"meson.build: dependency('{name}')", f"{pcdir}/{name}.pc"))
    for tool in ("meson", "ninja", "pkg-config", "cc", "fusermount3"):
        uses.append((f"build: {tool}", shutil.which(tool)))
    return needed(uses, [path for _, path in uses])


# used only when installed; the scripts say so when they skip them
OPTIONAL = {"linux-perf": "tests/bench/run_http_bench.sh's perf diagnostics"}


@pytest.mark.parametrize("mode", MODES)
def test_what_each_mode_runs_comes_from_its_list(mode):
    if not shutil.which("dpkg-query"):
        pytest.skip("not Debian: no dpkg-query")
    need = build_needs() if mode == "build" else owners_needed(mode)
    have = closure(listed(mode)) | every_debian()
    missing = {pkg: why for pkg, why in need.items() if pkg not in have and pkg not in OPTIONAL}
    assert not missing, f"not in install-deps --{mode} (nor a dependency of it): {missing}"


NPM_SHIM = ("echo \"npm $*\" >>{log}; mkdir -p node_modules/.bin; touch node_modules/.bin/s3rver; "
            "chmod +x node_modules/.bin/s3rver")


def fake_env(tmp_path, installed, uid, npm=True):
    """PATH shims alone (the machine's own tools linked in): dpkg-query says
    which packages are installed, apt-get and npm log their arguments, id
    says the uid. npm=False: no npm until apt-get installs Debian's."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "log"
    npm_shim = NPM_SHIM.format(log=log)
    shims = {
        "dpkg-query": "for a in \"$@\"; do case \" $FAKE_INSTALLED \" in *\" $a \"*) echo \"$a ii \";; esac; done",
        "apt-get": f"echo \"apt-get $*\" >>{log}; case \" $* \" in *\" npm \"*) "
                   f"printf '#!/bin/sh\\n%s\\n' '{npm_shim}' >{bin_}/npm; chmod +x {bin_}/npm;; esac",
        "id": f"echo {uid}",
    }
    if npm:
        shims["npm"] = npm_shim
    for name, body in shims.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    for tool in ("sh", "bash", "grep", "mkdir", "touch", "chmod", "printf", "cat"):
        if shutil.which(tool) and not (bin_ / tool).exists():
            (bin_ / tool).symlink_to(shutil.which(tool))
    env = dict(os.environ, PATH=str(bin_), FAKE_INSTALLED=" ".join(installed),
               DWSFS_S3DIR=str(tmp_path / "npm"))
    env.pop("DWSFS_SKIP_DEPS", None)
    return env, log


def run_deps(env, *args):
    return subprocess.run([shutil.which("bash"), str(INSTALL_DEPS), *args], env=env, capture_output=True, text=True,
                          timeout=30)


def test_install_deps_not_root_names_what_is_missing(tmp_path):
    test = listed("test")
    env, log = fake_env(tmp_path, [p for p in test if p != "python3-pytest"], uid=1000)
    p = run_deps(env, "--test")
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1, p.stderr
    assert "python3-pytest" in p.stderr and "s3rver" in p.stderr and "install-deps --test" in p.stderr, p.stderr
    assert not log.exists(), log.read_text()


def test_install_deps_as_root_installs_what_is_missing(tmp_path):
    test = listed("test")
    env, log = fake_env(tmp_path, [p for p in test if p not in ("python3-pytest", "nginx")], uid=0)
    p = run_deps(env, "--test")
    assert p.returncode == 0, p.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "apt-get update -qq"
    assert calls[1].startswith("apt-get install -y ")
    assert set(apt_packages(calls[1])) == {"python3-pytest", "nginx"}, calls[1]
    assert calls[2].startswith("npm install") and "s3rver" in calls[2], calls
    # then nothing is missing: no apt-get, no npm
    log.unlink()
    env["FAKE_INSTALLED"] = " ".join(test)
    p = run_deps(env, "--test")
    assert p.returncode == 0 and not log.exists(), p.stderr


def test_install_deps_takes_debians_npm_only_without_one(tmp_path):
    """No npm on the machine: Debian's npm package comes with the rest
    (with one, as nodesource's nodejs carries, it would conflict)."""
    test = listed("test")
    env, log = fake_env(tmp_path, test, uid=0, npm=False)
    p = run_deps(env, "--test")
    assert p.returncode == 0, p.stderr
    calls = log.read_text().splitlines()
    assert set(apt_packages(calls[1])) == {"npm"}, calls
    assert calls[2].startswith("npm install") and "s3rver" in calls[2], calls


# ---- B: meson install under the prefix ---------------------------------

def build_prefix(build):
    opts = json.loads(subprocess.run(["meson", "introspect", "--buildoptions", str(build)], capture_output=True,
                                     text=True, check=True, timeout=60).stdout)
    return {o["name"]: o["value"] for o in opts}


def test_meson_install_stays_under_the_prefix(tmp_path):
    build = Path(DWSFS).resolve().parent
    opts = build_prefix(build)
    prefix = opts["prefix"]
    if prefix == "/usr":
        pytest.skip("prefix /usr: the unit goes where pkg-config's systemd says (test below)")
    dest = tmp_path / "dest"
    p = subprocess.run(["meson", "install", "-C", str(build), "--no-rebuild", "--destdir", str(dest)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    root = dest / prefix.lstrip("/")
    outside = [str(f.relative_to(dest)) for f in dest.rglob("*")
               if not (f.is_dir() and not f.is_symlink()) and root not in f.parents]
    assert not outside, f"meson install wrote outside {prefix}: {outside}"
    sbin = root / opts["sbindir"]
    assert os.access(sbin / "mount.dwsfs", os.X_OK)
    assert os.readlink(sbin / "mount.fuse.dwsfs") == "mount.dwsfs"
    unit = (root / "lib/systemd/system/dwsfs@.service").read_text()
    assert f"\nExecStart={prefix}/{opts['bindir']}/dwsfs -f " in unit, unit
    assert not re.search(r"@[A-Z_]+@", unit), unit


def test_prefix_usr_puts_the_unit_where_systemd_says(tmp_path):
    b = tmp_path / "b"
    p = subprocess.run(["meson", "setup", str(b), str(REPO), "--prefix=/usr"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    plan = json.loads(subprocess.run(["meson", "introspect", "--install-plan", str(b)], capture_output=True,
                                     text=True, check=True, timeout=60).stdout)
    dests = {Path(k).name: v["destination"] for sect in plan.values() for k, v in sect.items()}
    assert dests["mount.dwsfs"] == "{sbindir}/mount.dwsfs"
    r = subprocess.run(["pkg-config", "--variable=systemdsystemunitdir", "systemd"], capture_output=True,
                       text=True, timeout=30)
    unitdir = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "/usr/lib/systemd/system"
    assert dests["dwsfs@.service"] in (f"{unitdir}/dwsfs@.service", "{prefix}" + unitdir[4:] + "/dwsfs@.service"), \
        dests["dwsfs@.service"]
    unit = (b / "mount-helpers" / "dwsfs@.service").read_text()
    assert "\nExecStart=/usr/bin/dwsfs -f " in unit, unit


# ---- C: the image and the Kubernetes example ----------------------------

def readme_install_block():
    text = (REPO / "README.md").read_text()
    sec = text.split("## Install and build", 1)[1]
    return re.search(r"```sh\n(.*?)```", sec, re.S).group(1)


def dockerfile_stages():
    stages = []
    for line in joined_lines((REPO / "Dockerfile").read_text()):
        m = re.match(r"\s*([A-Z]+)\s+(.*)", line)
        if not m:
            continue
        inst, arg = m.groups()
        if inst == "FROM":
            stages.append({"from": arg, "run": [], "lines": []})
        elif stages:
            stages[-1]["lines"].append((inst, arg))
            if inst == "RUN":
                stages[-1]["run"].append(arg)
    return stages


def build_commands(lines):
    cmds = []
    for line in lines:
        for c in line.split("&&"):
            c = " ".join(shell_words(c.split("#")[0]))
            if c.startswith(("meson ", "ninja ")):
                cmds.append(c)
    return cmds


def test_dockerfile_builds_as_the_readme_says():
    builder, runtime = dockerfile_stages()
    assert re.match(r"debian:bookworm\b", builder["from"]) and builder["from"].endswith(" AS builder")
    assert re.fullmatch(r"debian:bookworm(-slim)?", runtime["from"])
    want = build_commands(joined_lines(readme_install_block()))
    assert want == ["meson setup build", "ninja -C build", "ninja -C build install"], want
    assert build_commands(builder["run"]) == want
    assert ("COPY", "--from=builder /usr/local /usr/local") in runtime["lines"], "the runtime takes the prefix"
    entry = [json.loads(a) for i, a in runtime["lines"] if i == "ENTRYPOINT"]
    assert entry == [["dwsfs", "-f"]], entry


def test_dockerfile_runtime_has_the_libraries_dwsfs_links():
    """Every library dwsfs and dwsctl were linked with comes from a package the
    runtime stage installs or that every Debian has (on Debian 12, the
    image's release: the library package names are bookworm's)."""
    runtime = dockerfile_stages()[1]
    apt = [c for c in runtime["run"] if "apt-get install" in c]
    assert len(apt) == 1, apt
    pkgs = set(apt_packages(apt[0]))
    assert {"fuse3", "ca-certificates"} <= pkgs
    if not Path("/etc/debian_version").read_text().startswith("12"):
        pytest.skip("the image is Debian 12; this host's library packages are named otherwise")
    build = Path(DWSFS).resolve().parent
    have = closure(pkgs) | every_debian()
    for exe in ("dwsfs", "dwsctl"):
        dyn = subprocess.run(["readelf", "-d", str(build / exe)], capture_output=True, text=True, check=True,
                             timeout=30).stdout
        ldd = subprocess.run(["ldd", str(build / exe)], capture_output=True, text=True, check=True, timeout=30).stdout
        where = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
        for so in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn):
            if re.match(r"lib(asan|ubsan|lsan|tsan)\.", so):
                continue  # the sanitizer build's runtime, not the image's
            pkg = owners([where[so]])[where[so]]
            assert pkg in pkgs or pkg in have, f"{exe} links {so} ({pkg}), not in the runtime stage"


def daemonset():
    docs = [d for d in yaml.safe_load_all((REPO / "deploy/k8s/daemonset.yaml").read_text()) if d]
    assert [d["kind"] for d in docs] == ["DaemonSet"]
    return docs[0]


def test_daemonset_mounts_fuse_for_the_node():
    check_daemonset()


def check_daemonset():
    """The DaemonSet's checks; returns the hostPath its mount propagates to."""
    ds = daemonset()
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    [c] = pod["containers"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert c["securityContext"]["privileged"] is True
    fuse = vols[mounts["/dev/fuse"]["name"]]["hostPath"]
    assert fuse == {"path": "/dev/fuse", "type": "CharDevice"}
    bidir = [m for m in c["volumeMounts"] if m.get("mountPropagation") == "Bidirectional"]
    assert len(bidir) == 1, c["volumeMounts"]
    host = vols[bidir[0]["name"]]["hostPath"]
    env = {e["name"]: e for e in c["env"]}
    mnt = env["MOUNTPOINT"]["value"]
    assert Path(bidir[0]["mountPath"]) in Path(mnt).parents, "the mount must be inside the shared hostPath"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    script = " ".join(c["command"] + c["args"])
    assert re.search(r'exec dwsfs -f "\$BUCKET" "\$MOUNTPOINT"', script), script
    stop = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    assert re.search(r"(fusermount3 -u|umount)\b.*\$MOUNTPOINT", stop), stop
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    return host


def test_docs_inference_pod_sees_the_daemonsets_mount():
    """docs/containers.md's inference pod mounts the DaemonSet's hostPath
    with HostToContainer propagation."""
    ds_host = check_daemonset()
    text = (REPO / "docs/containers.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    pods = [d for b in blocks for d in yaml.safe_load_all(b) if d and d.get("kind") == "Pod"]
    assert len(pods) == 1, "docs/containers.md shows one inference Pod"
    spec = pods[0]["spec"]
    vols = {v["name"]: v for v in spec["volumes"] if "hostPath" in v}
    containers = spec["containers"] + spec.get("initContainers", [])
    seen = [m for c in containers for m in c.get("volumeMounts", []) if m["name"] in vols]
    assert seen and all(m.get("mountPropagation") == "HostToContainer" for m in seen), seen
    assert {vols[m["name"]]["hostPath"]["path"] for m in seen} == {ds_host["path"]}
