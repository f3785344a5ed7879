"""`python -m comfyui_xdit_hunyuan demo|generate|bench ...`: see comfyui_xdit_hunyuan/cli/."""
import sys

from comfyui_xdit_hunyuan.cli import main

if __name__ == "__main__":
    sys.exit(main())
