# onnxruntime_headers.cmake: find the onnxruntime C/C++ API headers; sets ONNX_NF4_ORT_INCLUDE.
#
# onnxruntime's Python wheels ship no headers. In order:
#   1. the CMake cache variable / environment variable ONNXRUNTIME_INCLUDE_DIR (a directory that holds
#      onnxruntime_cxx_api.h, e.g. the include/ of an onnxruntime release archive);
#   2. a cached copy under ONNX_NF4_CACHE_DIR (default: $XDG_CACHE_HOME/onnx_nf4 or ~/.cache/onnx_nf4);
#   3. the official headers of onnxruntime 1.29 (ORT_API_VERSION 29, MIT) from the pinned npm package
#      com.github.asus4.onnxruntime@0.4.9, fetched once with `npm pack`, checked against a SHA-256, and
#      unpacked into the cache.
# Headers of API version V work with any onnxruntime >= the release of V (the library asks the runtime
# for the API table of version V at load time).

set(ONNX_NF4_ORT_NPM_PACKAGE "com.github.asus4.onnxruntime")
set(ONNX_NF4_ORT_NPM_VERSION "0.4.9")
set(ONNX_NF4_ORT_NPM_SHA256 "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d")
set(ONNX_NF4_ORT_NPM_HEADERS
    "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/onnxruntime.framework/Headers")

set(ONNXRUNTIME_INCLUDE_DIR "$ENV{ONNXRUNTIME_INCLUDE_DIR}" CACHE PATH
    "Directory with the onnxruntime C/C++ API headers (empty: download the pinned official headers)")

if(ONNXRUNTIME_INCLUDE_DIR)
  if(NOT EXISTS "${ONNXRUNTIME_INCLUDE_DIR}/onnxruntime_cxx_api.h")
    message(FATAL_ERROR "ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR} has no onnxruntime_cxx_api.h")
  endif()
  message(STATUS "onnx_nf4: onnxruntime headers from ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR}")
  set(ONNX_NF4_ORT_INCLUDE "${ONNXRUNTIME_INCLUDE_DIR}")
  return()
endif()

if(DEFINED ENV{ONNX_NF4_CACHE_DIR})
  set(_cache_root "$ENV{ONNX_NF4_CACHE_DIR}")
elseif(DEFINED ENV{XDG_CACHE_HOME})
  set(_cache_root "$ENV{XDG_CACHE_HOME}/onnx_nf4")
elseif(WIN32)
  set(_cache_root "$ENV{LOCALAPPDATA}/onnx_nf4")
else()
  set(_cache_root "$ENV{HOME}/.cache/onnx_nf4")
endif()
set(ONNX_NF4_CACHE_DIR "${_cache_root}" CACHE PATH "Cache of downloaded build inputs")
set(_hdr_dir "${ONNX_NF4_CACHE_DIR}/onnxruntime-headers-npm-${ONNX_NF4_ORT_NPM_VERSION}-${ONNX_NF4_ORT_NPM_SHA256}")
set(_stamp "${_hdr_dir}/.complete")

if(NOT EXISTS "${_stamp}")
  set(_work "${CMAKE_CURRENT_BINARY_DIR}/ort_headers_download")
  set(_tgz "${_work}/${ONNX_NF4_ORT_NPM_PACKAGE}-${ONNX_NF4_ORT_NPM_VERSION}.tgz")
  file(REMOVE_RECURSE "${_work}")
  file(MAKE_DIRECTORY "${_work}")
  find_program(_npm NAMES npm npm.cmd)
  if(NOT _npm)
    message(FATAL_ERROR "onnx_nf4: npm is needed once to fetch the onnxruntime headers "
                        "(${ONNX_NF4_ORT_NPM_PACKAGE}@${ONNX_NF4_ORT_NPM_VERSION}) and is not installed. Install npm, "
                        "or set ONNXRUNTIME_INCLUDE_DIR to a directory with the onnxruntime C/C++ headers.")
  endif()
  message(STATUS "onnx_nf4: fetching onnxruntime headers with npm pack "
                 "(${ONNX_NF4_ORT_NPM_PACKAGE}@${ONNX_NF4_ORT_NPM_VERSION}, 150 MB, once)")
  execute_process(COMMAND "${_npm}" pack "${ONNX_NF4_ORT_NPM_PACKAGE}@${ONNX_NF4_ORT_NPM_VERSION}" --silent
                  WORKING_DIRECTORY "${_work}" RESULT_VARIABLE _npm_rc OUTPUT_QUIET)
  if(NOT _npm_rc EQUAL 0 OR NOT EXISTS "${_tgz}")
    message(FATAL_ERROR "onnx_nf4: npm pack ${ONNX_NF4_ORT_NPM_PACKAGE}@${ONNX_NF4_ORT_NPM_VERSION} failed. "
                        "Set ONNXRUNTIME_INCLUDE_DIR to a directory with the onnxruntime C/C++ headers.")
  endif()
  file(SHA256 "${_tgz}" _sha)
  if(NOT _sha STREQUAL ONNX_NF4_ORT_NPM_SHA256)
    message(FATAL_ERROR "onnx_nf4: ${_tgz} has SHA-256 ${_sha}, expected ${ONNX_NF4_ORT_NPM_SHA256}")
  endif()
  execute_process(COMMAND "${CMAKE_COMMAND}" -E tar xzf "${_tgz}" -- "${ONNX_NF4_ORT_NPM_HEADERS}"
                  WORKING_DIRECTORY "${_work}" RESULT_VARIABLE _tar_rc)
  if(NOT _tar_rc EQUAL 0)
    message(FATAL_ERROR "onnx_nf4: could not unpack the onnxruntime headers from ${_tgz}")
  endif()
  # Publish atomically: copy to a temporary directory, then rename into place.
  string(SHA1 _tmp_tag "${CMAKE_CURRENT_BINARY_DIR}")
  set(_tmp "${_hdr_dir}.tmp-${_tmp_tag}")
  file(REMOVE_RECURSE "${_tmp}")
  file(MAKE_DIRECTORY "${_tmp}")
  file(GLOB _headers "${_work}/${ONNX_NF4_ORT_NPM_HEADERS}/*.h")
  if(NOT _headers)
    message(FATAL_ERROR "onnx_nf4: no headers found in ${_tgz}")
  endif()
  file(COPY ${_headers} DESTINATION "${_tmp}")
  file(TOUCH "${_tmp}/.complete")
  if(NOT EXISTS "${_stamp}")
    file(REMOVE_RECURSE "${_hdr_dir}")
    file(RENAME "${_tmp}" "${_hdr_dir}" RESULT _rename_rc)
  endif()
  file(REMOVE_RECURSE "${_tmp}" "${_work}")
  if(NOT EXISTS "${_stamp}")
    message(FATAL_ERROR "onnx_nf4: could not populate ${_hdr_dir}")
  endif()
endif()

set(ONNX_NF4_ORT_INCLUDE "${_hdr_dir}")
message(STATUS "onnx_nf4: onnxruntime headers (API 29) from ${ONNX_NF4_ORT_INCLUDE}")
