# pw_warnings: the flags every target of ours carries (STYLE.md: Tests and builds).
add_library(pw_warnings INTERFACE)
target_compile_options(pw_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:C>:-Wall -Wextra -Wshadow -Wstrict-prototypes -Wformat=2
    -Wno-unused-parameter -Wvla>)
if(PW_WERROR)
  target_compile_options(pw_warnings INTERFACE $<$<COMPILE_LANGUAGE:C>:-Werror>)
endif()
# _GNU_SOURCE once here so every file sees the same libc surface (mmap, clock_gettime, ...).
target_compile_definitions(pw_warnings INTERFACE _GNU_SOURCE)

if(PW_SANITIZE)
  set(pw_san -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
  add_compile_options("$<$<COMPILE_LANGUAGE:C>:${pw_san}>")
  add_link_options(${pw_san})
endif()

# pw_add_exe(name src...): one of our executables, with our warnings.
function(pw_add_exe name)
  add_executable(${name} ${ARGN})
  target_link_libraries(${name} PRIVATE pw_warnings)
endfunction()
