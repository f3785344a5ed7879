"""Run by ComfyUI-Manager after it clones the pack: installs it into ComfyUI's Python, editable, so that
`comfyui_xdit_hunyuan` (and its worker pool, the `worker/` folder) import from this folder."""
import os
import subprocess
import sys

if __name__ == "__main__":
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-e", os.path.dirname(os.path.abspath(__file__))])
