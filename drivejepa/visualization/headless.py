"""Can this machine render with Open3D? Asked in a child process, because a missing Vulkan driver aborts the process.

Open3D 0.20's ``OffscreenRenderer`` renders through Vulkan on Mesa's software rasteriser. When a system package is
missing the failure is a hard abort (SIGABRT) or an import error deep in a shared library, neither of which a caller
can catch. :func:`probe_rendering` therefore imports Open3D and renders one tiny image in a subprocess, and when that
fails it names the Debian package to install (``libusb-1.0-0``, ``libvulkan1`` or ``mesa-vulkan-drivers``).
"""
from __future__ import annotations

import ctypes.util
import dataclasses
import functools
import glob
import os
import subprocess
import sys
from typing import Optional

SYSTEM_PACKAGES = ("libusb-1.0-0", "libvulkan1", "mesa-vulkan-drivers")

# The child prints a marker before each stage so the parent knows where it stopped.
_PROBE_SCRIPT = """
import sys
print("stage:import", flush=True)
import open3d
from open3d.visualization import rendering
print("stage:render", flush=True)
r = rendering.OffscreenRenderer(16, 16)
r.scene.set_background([0.0, 0.0, 0.0, 1.0])
r.setup_camera(60.0, [0.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 1.0, 0.0])
img = r.render_to_image()
print("stage:ok", flush=True)
"""

_ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")


@dataclasses.dataclass(frozen=True)
class RenderSupport:
    ok: bool
    message: str = ""                      # why rendering is impossible and what to install; empty when ok
    missing_package: Optional[str] = None  # the Debian package to install, when it could be told


def _vulkan_driver_files() -> list[str]:
    """Vulkan ICD manifests the loader would use (honouring VK_DRIVER_FILES / VK_ICD_FILENAMES)."""
    override = os.environ.get("VK_DRIVER_FILES") or os.environ.get("VK_ICD_FILENAMES")
    if override:
        return [p for p in override.split(os.pathsep) if p and os.path.isfile(p)]
    files: list[str] = []
    for d in _ICD_DIRS:
        files.extend(glob.glob(os.path.join(d, "*.json")))
    return files


def diagnose(stage: str, returncode: int, output: str) -> RenderSupport:
    """Turn a failed probe (the last stage reached, the exit code, the child's output) into a clear message."""
    tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:] if line.strip())
    install = "install it with: apt-get install {}"
    if stage == "import":
        if "libusb" in output:
            pkg = "libusb-1.0-0"
            return RenderSupport(False, f"Open3D cannot be imported: the system package {pkg} is missing; "
                                        + install.format(pkg), pkg)
        return RenderSupport(False, f"Open3D cannot be imported ({tail or f'exit code {returncode}'})")
    if ctypes.util.find_library("vulkan") is None:
        pkg = "libvulkan1"
        return RenderSupport(False, f"Open3D cannot render headless: the Vulkan loader ({pkg}) is missing; "
                                    + install.format(f"{pkg} mesa-vulkan-drivers"), pkg)
    if not _vulkan_driver_files():
        pkg = "mesa-vulkan-drivers"
        where = "the files named by VK_DRIVER_FILES/VK_ICD_FILENAMES do not exist" if (
            os.environ.get("VK_DRIVER_FILES") or os.environ.get("VK_ICD_FILENAMES")) else "no Vulkan driver is installed"
        return RenderSupport(False, f"Open3D cannot render headless: {where}; the system package {pkg} provides "
                                    f"Mesa's software Vulkan driver; " + install.format(pkg), pkg)
    return RenderSupport(False, "Open3D cannot render headless (the renderer exited with code "
                                f"{returncode}: {tail}); check that the system packages "
                                f"{', '.join(SYSTEM_PACKAGES)} are installed")


@functools.lru_cache(maxsize=None)
def _probe_cached(env_key: tuple) -> RenderSupport:
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return RenderSupport(False, "Open3D's offscreen renderer did not start within 120 s")
    stages = [line[len("stage:"):] for line in proc.stdout.splitlines() if line.startswith("stage:")]
    if proc.returncode == 0 and stages and stages[-1] == "ok":
        return RenderSupport(True)
    return diagnose(stages[-1] if stages else "import", proc.returncode, proc.stdout + "\n" + proc.stderr)


def probe_rendering() -> RenderSupport:
    """Whether Open3D can render offscreen here; the answer is cached per process and Vulkan environment."""
    key = tuple(os.environ.get(k, "") for k in ("VK_DRIVER_FILES", "VK_ICD_FILENAMES", "LD_LIBRARY_PATH"))
    return _probe_cached(key)


def display_available() -> bool:
    """True when an interactive window can be opened (an X11 or Wayland display is set)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
