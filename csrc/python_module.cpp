// The Python module spinalkern._C (setup.py builds it; the CMake library for libtorch users
// has no Python).  Importing it loads the library, which registers the ops
// (torch.ops.spinalkern.cuda_*); the module itself holds one function:
//
//   head_forward(x, weights, biases, seed, kind, num_splits, dropout, save_hidden) -> y
//       spinalkern::cuda_head_forward called straight from Python, returning y.  Calling an op
//       through torch.ops parses every argument against the schema and boxes it (a few
//       microseconds, as much as the CPU kernel of a small head); this passes the tensors to
//       the dispatcher as they are.  The dispatcher still runs everything (autograd, the CPU or
//       CUDA kernel, dispatch modes such as FakeTensorMode).  It returns NotImplemented when
//       an argument is a Tensor subclass other than Parameter, or a TorchFunctionMode is
//       active, whose __torch_function__ only torch.ops honours: the caller then calls
//       torch.ops.  (spinalkern/cuda_backend.py; the modules use it outside torch.compile.)
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>
#include <vector>

#include "op_handles.h"

namespace {

// A plain Tensor or Parameter (nothing whose __torch_function__ could differ from Tensor's).
bool plain_tensor(PyObject* obj) { return THPVariable_CheckExact(obj); }

// The tensors of a list or tuple of plain tensors into out; false for anything else.
bool plain_tensors(PyObject* seq, std::vector<at::Tensor>& out) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!plain_tensor(items[i])) return false;
    out.push_back(THPVariable_Unpack(items[i]));
  }
  return true;
}

PyObject* head_forward(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 8, "head_forward takes 8 arguments (x, weights, biases, seed, "
                   "kind, num_splits, dropout, save_hidden), got ", nargs);
  if (at::impl::torch_function_mode_enabled() || !plain_tensor(args[0]))
    Py_RETURN_NOTIMPLEMENTED;
  std::vector<at::Tensor> weights, biases;
  if (!plain_tensors(args[1], weights) || !plain_tensors(args[2], biases))
    Py_RETURN_NOTIMPLEMENTED;
  std::optional<at::Tensor> seed;
  if (args[3] != Py_None) {
    if (!plain_tensor(args[3])) Py_RETURN_NOTIMPLEMENTED;
    seed = THPVariable_Unpack(args[3]);
  }
  const int64_t kind = PyLong_AsLongLong(args[4]);
  const int64_t num_splits = PyLong_AsLongLong(args[5]);
  const double dropout = PyFloat_AsDouble(args[6]);
  const int save_hidden = PyObject_IsTrue(args[7]);
  if (PyErr_Occurred() || save_hidden < 0) return nullptr;
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;  // as torch.ops does while an op runs
    y = std::get<0>(spinalkern::forward_op().call(THPVariable_Unpack(args[0]), weights, biases,
                                                  seed, kind, num_splits, dropout,
                                                  save_hidden != 0));
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"head_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(head_forward)),
     METH_FASTCALL,
     "head_forward(x, weights, biases, seed, kind, num_splits, dropout, save_hidden) -> y: "
     "spinalkern::cuda_head_forward without torch.ops' argument parsing (NotImplemented for "
     "Tensor subclasses and under a TorchFunctionMode)"},
    {nullptr, nullptr, 0, nullptr}};

struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                 "spinalkern CUDA/C++ extension (ops in torch.ops.spinalkern)",
                                 -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr) {
#ifdef SK_WITH_CUDA
    PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
    PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  }
  return m;
}
