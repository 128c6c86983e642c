"""Run the IconMatting command line from any folder, e.g. from the ComfyUI root:

    python custom_nodes/comfyui-iconmatting/iconmatting.py convert icm.ckpt models/iconmatting/icm.safetensors
    python custom_nodes/comfyui-iconmatting/iconmatting.py matte --reference ... --mask ... --targets ... --out ...

Same commands as ``python -m iconmatting_core`` and the ``iconmatting`` command of ``pip install
"comfyui-iconmatting[cli]"``. Python puts this file's folder first on ``sys.path``, so the pack's own
``iconmatting_core`` is the one that runs.
"""
import sys

if __name__ == "__main__":
    from iconmatting_core.__main__ import main

    sys.exit(main())
