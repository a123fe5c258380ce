"""Integration with onnxruntime-genai and Hugging Face checkpoints.

Owns genai model folders (:mod:`.folder`: ``quantize IN_DIR OUT_DIR``, staging, the op library copied in), the
``export-genai`` path from a transformers checkpoint (:mod:`.export`, through onnxruntime-genai's model builder),
reading float or bitsandbytes checkpoints (:mod:`.hf_checkpoint`) and LoRA adapters switched at run time
(:mod:`.adapters`). May import every layer below the CLI
(``api``, ``passes``, ``methods``, ``model``, ``op``, ``codec``, ``runtime``) and :mod:`onnx_nf4.torch`; its
optional dependencies (onnxruntime-genai, torch, transformers) are imported inside the functions that need them.
"""
