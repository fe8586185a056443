"""Checks ``dist/`` after ``make dist``: what a package index would be sent.

Run as ``python -m tests.dist_check --plat manylinux_2_27_x86_64 dist`` from
the source tree. Exits non-zero, saying why, unless:
- ``dist/`` holds exactly one sdist and one wheel, of the source's version
  (``lovasz_jax/__init__.py``), which is also the CHANGELOG's newest version;
- the wheel is tagged ``--plat`` (no plain ``linux_*`` tag), and
  ``auditwheel show`` finds it consistent with that policy or an older one;
- every versioned symbol that the kernel imports (``objdump -T``) is within
  the policy: glibc no newer than it allows, no libstdc++ symbols at all
  (libstdc++ is linked statically), and only system libraries needed;
- the wheel's package files are the sdist's Python files, ``py.typed`` and
  the compiled kernel, and no C++ source.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Libraries that every manylinux policy takes from the system.
SYSTEM_LIBRARIES = {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0",
                    "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2",
                    "ld-linux-aarch64.so.1"}


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(p) for p in text.split("."))


def source_version() -> str:
  text = (ROOT / "lovasz_jax" / "__init__.py").read_text(encoding="utf-8")
  return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def changelog_version() -> str:
  text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
  return re.search(r"^## \[(\d+\.\d+\.\d+)\]", text, re.MULTILINE).group(1)


def symbol_versions(library: pathlib.Path) -> set[str]:
  """The version names of the symbols ``library`` imports or defines."""
  out = subprocess.run(["objdump", "-T", str(library)], check=True,
                       capture_output=True, text=True).stdout
  versions = set()
  for line in out.splitlines():
    match = re.search(r"\s\(?([A-Z][A-Z_]*_[0-9][0-9.]*)\)?\s+\S+$", line)
    if match:
      versions.add(match.group(1))
  return versions


def needed(library: pathlib.Path) -> set[str]:
  out = subprocess.run(["objdump", "-p", str(library)], check=True,
                       capture_output=True, text=True).stdout
  return set(re.findall(r"^\s+NEEDED\s+(\S+)", out, re.MULTILINE))


def check_library(library: pathlib.Path, max_glibc: tuple[int, ...]) -> list[str]:
  failures = []
  versions = symbol_versions(library)
  if not any(v.startswith("GLIBC_") for v in versions):
    failures.append(f"objdump -T found no GLIBC_ symbol versions in {library.name}: "
                    "is this the kernel?")
  for name in sorted(versions):
    kind, _, number = name.rpartition("_")
    if kind == "GLIBC" and _version(number) > max_glibc:
      failures.append(f"{library.name} needs {name}, newer than the policy's "
                      f"glibc {'.'.join(map(str, max_glibc))}")
    elif kind in ("GLIBCXX", "CXXABI"):
      failures.append(f"{library.name} needs libstdc++'s {name} (libstdc++ "
                      "should be linked statically)")
  extra = needed(library) - SYSTEM_LIBRARIES
  if extra:
    failures.append(f"{library.name} needs libraries outside the policy: "
                    f"{sorted(extra)}")
  print(f"{library.name}: versions {sorted(versions, key=lambda v: (v.rsplit('_', 1)[0], _version(v.rsplit('_', 1)[1])))}, "
        f"needs {sorted(needed(library))}")
  return failures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--plat", required=True, help="e.g. manylinux_2_27_x86_64")
  parser.add_argument("dist", type=pathlib.Path)
  args = parser.parse_args(argv)
  match = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", args.plat)
  if not match:
    print(f"--plat {args.plat}: expected manylinux_X_Y_ARCH")
    return 2
  max_glibc = (int(match.group(1)), int(match.group(2)))

  failures = []
  files = sorted(p.name for p in args.dist.iterdir())
  sdists = [f for f in files if f.endswith(".tar.gz")]
  wheels = [f for f in files if f.endswith(".whl")]
  if len(sdists) != 1 or len(wheels) != 1 or len(files) != 2:
    print(f"dist/ must hold one sdist and one wheel, and nothing else: {files}")
    return 1
  sdist, wheel = args.dist / sdists[0], args.dist / wheels[0]

  version = source_version()
  if changelog_version() != version:
    failures.append(f"CHANGELOG.md's newest version is {changelog_version()}, "
                    f"the package's {version}")
  if sdist.name != f"lovasz_jax-{version}.tar.gz":
    failures.append(f"sdist {sdist.name}: expected version {version}")
  tags = wheel.name[:-len(".whl")].split("-")
  if tags[:2] != ["lovasz_jax", version]:
    failures.append(f"wheel {wheel.name}: expected lovasz_jax {version}")
  platforms = tags[-1].split(".")
  if args.plat not in platforms or any(p.startswith("linux_") for p in platforms):
    failures.append(f"wheel {wheel.name}: platform tags {platforms}, "
                    f"expected {args.plat}")

  show = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(wheel)],
                        capture_output=True, text=True, check=False)
  print(show.stdout.strip())
  consistent = re.search(r'consistent with the following platform tag:\s*"'
                         r'manylinux_(\d+)_(\d+)_', show.stdout.replace("\n", " "))
  if show.returncode or not consistent:
    failures.append(f"auditwheel show failed or named no manylinux tag:\n"
                    f"{show.stdout}{show.stderr}")
  elif (int(consistent.group(1)), int(consistent.group(2))) > max_glibc:
    failures.append(f"auditwheel show: only manylinux_{consistent.group(1)}_"
                    f"{consistent.group(2)}, newer than {args.plat}")

  with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    libraries = [n for n in names if n.startswith("lovasz_jax/_cpu_kernel")
                 and n.endswith(".so")]
    if len(libraries) != 1:
      failures.append(f"the wheel should carry one kernel library, has {libraries}")
    for name in libraries:
      zf.extract(name, tmp)
      failures += check_library(pathlib.Path(tmp) / name, max_glibc)
    # Libraries auditwheel grafted in (there should be none).
    grafted = [n for n in names if ".libs/" in n]
    if grafted:
      failures.append(f"auditwheel grafted libraries into the wheel: {grafted}")
    package = {n for n in names
               if n.startswith("lovasz_jax/") and not n.endswith("/")}

  with tarfile.open(sdist) as tf:
    prefix = f"lovasz_jax-{version}/"
    in_sdist = {m.name[len(prefix):] for m in tf.getmembers()
                if m.name.startswith(prefix + "lovasz_jax/") and m.isfile()}
  expected = {n for n in in_sdist if n.endswith(".py") or n == "lovasz_jax/py.typed"}
  missing = expected - package
  unexpected = package - expected - set(libraries)
  if missing or unexpected:
    failures.append(f"the wheel's package differs from the sdist's: missing "
                    f"{sorted(missing)}, unexpected {sorted(unexpected)}")

  for failure in failures:
    print("FAIL:", failure)
  if not failures:
    print(f"ok: {sdist.name} and {wheel.name}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
