// ort_api.h: the one way this library includes the onnxruntime C++ API.
//
// The library is loaded by an onnxruntime that may be newer than the headers it was built with, so the API
// table is not looked up at load time: RegisterCustomOps calls Ort::InitApi with the table the runtime hands
// over (ORT_API_MANUAL_INIT). Every translation unit must include the API through this header so that the
// macro is the same everywhere.
#ifndef ONNX_NF4_ORT_API_H_
#define ONNX_NF4_ORT_API_H_

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT
#endif
#include <onnxruntime_cxx_api.h>

#endif  // ONNX_NF4_ORT_API_H_
