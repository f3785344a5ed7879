"""`python -m comfyui_xdit_hunyuan.bench_main [options]`: the benchmark on its own (same as `bench`)."""
import argparse
import sys

from .bench import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m comfyui_xdit_hunyuan bench", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
