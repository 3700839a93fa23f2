"""The stable finding codes: scripts match on them, so a code is never renamed or reused.

Severity is given per finding (the same code can be an error or a warning, e.g. LAYER_INCOMPLETE
for a missing g_idx is a warning unless act-order needs it).
"""

from __future__ import annotations

CODES: dict[str, str] = {
    # files and JSON
    "CONFIG_MISSING": "config.json is absent",
    "CONFIG_INCOMPLETE": "config.json lacks a field the checks need (num_hidden_layers)",
    "TOKENIZER_MISSING": "no tokenizer.json, tokenizer.model or vocab.json + merges.txt",
    "WEIGHTS_MISSING": "no *.safetensors weights (pickle weights are never read)",
    "JSON_INVALID": "a JSON file is malformed, too large, too deeply nested, or not an object",
    "FILE_UNREADABLE": "a file cannot be read or is not a regular file (a FIFO, a directory)",
    "SYMLINK_ESCAPE": "a symlink resolves outside the checkpoint directory; it is not followed",
    "PATH_ESCAPE": "the index names a file outside the checkpoint directory",
    # safetensors headers and shards
    "HEADER_CORRUPT": "a safetensors header is unparsable, absurdly long, overlapping, gapped or inconsistent",
    "FILE_TRUNCATED": "a weight file ends before its header or its tensors' data",
    "DTYPE_UNKNOWN": "a tensor has a dtype string the reader does not know",
    "DUPLICATE_TENSOR": "a tensor is stored twice (in one header or in two files)",
    "SHARD_MISSING": "a shard named by model.safetensors.index.json does not exist",
    "SHARD_UNREFERENCED": "a weight file the index does not name (loaders ignore it)",
    "INDEX_MISMATCH": "the index and the shards disagree about where a tensor lives",
    # metadata
    "META_MISSING": "no quantization metadata, or a required field (bits, group_size) is absent",
    "META_INVALID": "a metadata field has the wrong type or value",
    "META_CONFLICT": "config.json, quantize_config.json and quant_config.json disagree",
    "METHOD_UNKNOWN": "quant_method is neither gptq nor awq",
    "BITS_UNSUPPORTED": "a bit width the packed format or qserve does not support",
    "GPTQ_FORMAT_UNSUPPORTED": "a GPTQ checkpoint_format other than gptq / gptq_v2 (marlin, bitblas...)",
    "AWQ_VERSION_UNSUPPORTED": "an AWQ version other than gemm (gemv, gemv_fast, marlin are other layouts)",
    "AWQ_VERSION_DEFAULTED": "no AWQ version given; gemm assumed",
    "DYNAMIC_NOT_CHECKED": "GPTQModel per-module `dynamic` overrides are present but not evaluated",
    "ARCH_UNKNOWN": "an architecture qserve has no table for; only the tensors present are checked",
    # per-Linear structure
    "LAYER_INCOMPLETE": "a quantized Linear lacks qweight, qzeros, scales or g_idx",
    "LINEAR_NOT_QUANTIZED": "a Linear is unquantized but not listed in modules_to_not_convert",
    "SKIPPED_BUT_QUANTIZED": "a Linear listed in modules_to_not_convert is quantized",
    "LINEAR_MISSING": "a Linear of the architecture has no tensors at all",
    "NOTHING_QUANTIZED": "the metadata declares quantization but no tensor is quantized",
    "ORPHAN_TENSOR": "a tensor no module owns (extra block, weight beside qweight, AWQ g_idx)",
    "SHAPE_MISMATCH": "a tensor's shape does not follow from bits, group_size and the Linear's features",
    "DTYPE_MISMATCH": "a packed tensor is not int32, or scales are not fp16",
    "GROUP_SIZE_NOT_DIVIDING": "group_size does not divide a Linear's in_features",
    "UNQUANT_DTYPE_INCONSISTENT": "unquantized tensors (or config.json's dtype) disagree on the dtype",
    # --deep
    "ZERO_CONVENTION_MISMATCH": "the stored zeros fit another zero-point convention than the declared one",
    "GIDX_OUT_OF_RANGE": "g_idx points outside the groups of scales",
    "GIDX_NOT_MONOTONIC": "g_idx is permuted although desc_act is false",
    "GROUP_SIZE_WRONG": "g_idx does not make groups of group_size channels",
    "SCALES_NONPOSITIVE": "scales that are zero or negative",
    "NONFINITE": "NaN or Inf in scales or in an unquantized tensor",
    "MAGNITUDE_OUTLIER": "a Linear's dequantized sample is far larger or smaller than in its sibling blocks",
    "DATA_UNREADABLE": "tensor data could not be read although the header was sound",
}
