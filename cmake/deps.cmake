# Third-party dependencies, all from Debian packages (docs/DEPENDENCIES.md).
# tools/setup-deps.sh installs them; this file only finds them.
find_package(PkgConfig REQUIRED)
find_package(Threads REQUIRED)
find_package(OpenSSL 3.0 REQUIRED)
pkg_check_modules(LIBEVENT REQUIRED IMPORTED_TARGET libevent libevent_pthreads libevent_openssl)
pkg_check_modules(HIREDIS REQUIRED IMPORTED_TARGET hiredis)
pkg_check_modules(YAML REQUIRED IMPORTED_TARGET yaml-0.1)
pkg_check_modules(PROTOBUFC REQUIRED IMPORTED_TARGET libprotobuf-c)
pkg_check_modules(JANSSON REQUIRED IMPORTED_TARGET jansson)
pkg_check_modules(CMOCKA REQUIRED IMPORTED_TARGET cmocka)
find_program(PROTOC_C NAMES protoc-c REQUIRED)

# llhttp: Debian's node-llhttp ships the generated C sources; we build them as a static
# library with the compiler's default warnings (third-party code, not held to -Werror).
set(PW_LLHTTP_SRC_DIR /usr/share/llhttp CACHE PATH "llhttp C sources")
set(PW_LLHTTP_INC_DIR /usr/share/include/llhttp CACHE PATH "llhttp header")
if(NOT EXISTS ${PW_LLHTTP_SRC_DIR}/llhttp.c)
  message(FATAL_ERROR "llhttp sources not found in ${PW_LLHTTP_SRC_DIR}: run tools/setup-deps.sh")
endif()
add_library(llhttp STATIC ${PW_LLHTTP_SRC_DIR}/api.c ${PW_LLHTTP_SRC_DIR}/http.c
  ${PW_LLHTTP_SRC_DIR}/llhttp.c)
target_include_directories(llhttp SYSTEM PUBLIC ${PW_LLHTTP_INC_DIR})
set_target_properties(llhttp PROPERTIES POSITION_INDEPENDENT_CODE ON)
