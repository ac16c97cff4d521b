# Writes small generated models (one per weight type, tied and untied) into OUT.
# Run as: cmake -DGEN=parkway-gguf-gen -DOUT=dir -P gen_gguf_corpus.cmake
file(MAKE_DIRECTORY ${OUT})
foreach(type f32 f16 bf16 q8_0 q4_0 q4_1)
  execute_process(COMMAND ${GEN} --out ${OUT}/gen-${type}.gguf --shape custom --n-layer 1
                  --n-embd 32 --n-ff 64 --n-head 2 --n-head-kv 1 --n-vocab 300 --type ${type}
                  --seed 1 RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "parkway-gguf-gen --type ${type} failed: ${rc}")
  endif()
endforeach()
execute_process(COMMAND ${GEN} --out ${OUT}/gen-q4_1-tied.gguf --shape tiny --type q4_1 --tied
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "parkway-gguf-gen --tied failed: ${rc}")
endif()
