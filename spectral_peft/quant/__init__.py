"""4-bit (NF4/FP4) and 8-bit blockwise quantisation and the quantised frozen linear (QLoRA).

See docs/qlora.md. Names and behaviour follow bitsandbytes.functional.
"""
from .blockwise import (BLOCKSIZES_4BIT, BLOCKSIZES_8BIT, QuantState, bits_per_parameter, dequantize_4bit,
                        dequantize_absmax, dequantize_blockwise, double_quantize, int8_vectorwise_dequant,
                        int8_vectorwise_quant, pack_4bit, quantize_4bit, quantize_blockwise, unpack_4bit)
from .bnb_match import torch_mean_float32
from .codebooks import (QUANT_TYPES, create_dynamic_map, create_fp4_map, create_normal_map, get_4bit_code,
                        get_dynamic_map)
from .linear4bit import Linear4bit, frozen_weight_bytes, quantize_model

__all__ = [
    "BLOCKSIZES_4BIT", "BLOCKSIZES_8BIT", "QUANT_TYPES", "QuantState", "bits_per_parameter",
    "create_dynamic_map", "create_fp4_map", "create_normal_map", "dequantize_4bit", "dequantize_absmax",
    "dequantize_blockwise", "double_quantize", "frozen_weight_bytes", "get_4bit_code", "get_dynamic_map",
    "int8_vectorwise_dequant", "int8_vectorwise_quant", "Linear4bit", "pack_4bit", "quantize_4bit",
    "quantize_blockwise", "quantize_model", "torch_mean_float32", "unpack_4bit",
]
