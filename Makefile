# parkway: the two commands of the README, and a few helpers.
#   make up    installs what is missing, builds, runs the whole stack on this machine
#   make test  installs what is missing, builds, runs every test (Release, then ASan+UBSan)
# Build folders: build/ (Release) and build-asan/ (Debug + ASan + UBSan).

JOBS ?= $(shell nproc)
BUILD ?= build
BUILD_ASAN ?= build-asan
CMAKE_FLAGS ?=
CTEST_FLAGS ?= --output-on-failure
PARKWAY_UP_FLAGS ?=
# Tests to leave out of the ASan pass (a regex for ctest -E); none today. test_batch_api
# takes about 2 minutes under ASan (it kills and restarts processes over hundreds of lines).
ASAN_SKIP ?= ^$$

.PHONY: all deps build build-asan test test-release test-asan up bench clean format

all: build

deps:
	@tools/setup-deps.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

$(BUILD_ASAN)/CMakeCache.txt:
	cmake -S . -B $(BUILD_ASAN) -DCMAKE_BUILD_TYPE=Debug -DPW_SANITIZE=ON -DPW_CUDA=OFF $(CMAKE_FLAGS)

build-asan: deps $(BUILD_ASAN)/CMakeCache.txt
	cmake --build $(BUILD_ASAN) -j $(JOBS)

test-release: build
	ctest --test-dir $(BUILD) -j $(JOBS) $(CTEST_FLAGS)

test-asan: build-asan
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    ctest --test-dir $(BUILD_ASAN) -j $(JOBS) $(CTEST_FLAGS) -LE 'e2e|cuda' -E '$(ASAN_SKIP)'

test: test-release test-asan

up: build
	$(BUILD)/tools/parkway up $(PARKWAY_UP_FLAGS)

bench: build
	tools/run-bench.sh $(BUILD)

format:
	git ls-files '*.c' '*.h' | xargs clang-format -i

clean:
	rm -rf $(BUILD) $(BUILD_ASAN)
