"""Run the IconMatting command line from any folder, e.g. from the ComfyUI root:

    python custom_nodes/comfyui-iconmatting/iconmatting.py convert icm.ckpt models/iconmatting/icm.safetensors
    python custom_nodes/comfyui-iconmatting/iconmatting.py matte --reference ... --mask ... --targets ... --out ...

Same commands as ``python -m iconmatting_core`` (which only works from inside this folder).
"""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from iconmatting_core.__main__ import main

    sys.exit(main())
