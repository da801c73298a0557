// The modules' lanes: a whole eager module call as one hop from Python into C++, as torch's own layers are.
//
//   padded_rows(x, mask, weight, bias, ndims, eps, center, masked) -> y or None
//       masknorm::padded_rows_norm(x, mask, weight, bias, ndims, eps, center, masked == "zero")'s y
//   masked_channels(x, mask, weight, bias, groups, eps, policy) -> y or None
//       masknorm::masked_channels_norm(x, mask, weight, bias, groups, eps, policy)'s y
//   batch_channels(x, mask, weight, bias, masked, eps, running_mean, running_var, num_batches_tracked, momentum,
//                  max_numel, min_row) -> y or None
//       masknorm::per_channel_norm(x, mask, weight, bias, 0, eps, masked)'s y, then (running_mean not None) the
//       module's running update masknorm::per_channel_track(running_mean, running_var, num_batches_tracked,
//       mean, unbiased var, count, momentum)
//
// Each checks that the call is one its operator takes, calls the operator through the dispatcher (so its
// Autograd kernel records a node where a gradient is wanted) and returns y; None where the call is not the
// operator's (the module's route then checks it: raises its error, or runs it) or the operator flagged a row
// or group (the route redoes it; what the call recorded is dropped). Nothing is computed before the checks.
// The Python side checks what lives in Python only (torch.compile tracing, functorch transforms, forward-mode
// AD); here: every tensor a torch.Tensor (or nn.Parameter) that is a plain strided CPU tensor with data (no
// subclass, fake, meta, functional or batched wrapper), no TorchDispatchMode active, x of a floating dtype
// and non-empty, weight and bias of x's dtype, eps a Python float in [0, inf), the mask a bool tensor of
// the shape the module's convention gives. The operator runs without the GIL, as torch's bindings run theirs.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <tuple>

namespace {

// The dispatch keys of a plain CPU tensor with data (autograd's and autocast's included): anything else
// (Python for fake tensors and torch_dispatch subclasses, Meta, Functionalize, functorch's wrappers, sparse)
// declines.
const c10::DispatchKeySet kPlainCpu({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                     c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU});

bool plain_cpu(const at::Tensor& t) {
  return kPlainCpu.isSupersetOf(t.key_set()) && t.layout() == at::kStrided;
}

// obj as a plain CPU tensor, or nullptr: a torch.Tensor or nn.Parameter exactly (another subclass may
// override __torch_function__, which the route's calls honour).
const at::Tensor* tensor_of(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return plain_cpu(t) ? &t : nullptr;
}

// None, or a plain CPU tensor of `dtype` (nullopt when obj is neither).
bool optional_tensor(PyObject* obj, at::ScalarType dtype, c10::optional<at::Tensor>* out) {
  if (obj == Py_None) return true;
  const at::Tensor* t = tensor_of(obj);
  if (t == nullptr || t->scalar_type() != dtype) return false;
  *out = *t;
  return true;
}

bool floating(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// eps as a Python float in [0, inf) (an int, bool or NaN declines: the route says what is wrong).
bool eps_of(PyObject* obj, double* eps) {
  if (!PyFloat_CheckExact(obj)) return false;
  *eps = PyFloat_AS_DOUBLE(obj);
  return *eps >= 0.0 && std::isfinite(*eps);
}

// obj as a Python int in [0, 2^63), else -1 (another type, or out of range).
int64_t count_of(PyObject* obj) {
  if (!PyLong_CheckExact(obj)) return -1;
  const long long value = PyLong_AsLongLong(obj);
  if (value == -1 && PyErr_Occurred()) PyErr_Clear();
  return value < 0 ? -1 : value;
}

// The arguments the lanes share: x, mask, weight, bias at 0-3 and eps at 5.
struct Inputs {
  at::Tensor x;
  c10::optional<at::Tensor> mask, weight, bias;
  double eps = 0.0;
};

// The shared arguments where a lane takes them: x a plain non-empty CPU tensor of a floating dtype, mask,
// weight and bias None or plain CPU tensors (mask bool, weight and bias of x's dtype), eps as eps_of; no
// TorchDispatchMode active. A wrong count of arguments is an error.
bool inputs_of(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t expected, const char* lane, Inputs* in) {
  TORCH_CHECK(nargs == expected, lane, " takes ", expected, " arguments, got ", nargs);
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || !eps_of(args[5], &in->eps)) return false;
  const at::Tensor* x = tensor_of(args[0]);
  if (x == nullptr || !floating(x->scalar_type()) || x->numel() == 0) return false;
  in->x = *x;
  return optional_tensor(args[1], at::kBool, &in->mask) && optional_tensor(args[2], x->scalar_type(), &in->weight) &&
         optional_tensor(args[3], x->scalar_type(), &in->bias);
}

// masked as a policy name ("normalize", "keep" or "zero"), or an empty view for anything else.
c10::string_view policy_name(PyObject* masked) {
  if (!PyUnicode_CheckExact(masked)) return {};
  Py_ssize_t size = 0;
  const char* name = PyUnicode_AsUTF8AndSize(masked, &size);
  if (name == nullptr) {
    PyErr_Clear();
    return {};
  }
  const c10::string_view view(name, size);
  return view == "normalize" || view == "keep" || view == "zero" ? view : c10::string_view();
}

// masked as padded_rows_norm's `zero` flag: 1 for "zero", 0 for "normalize" or "keep" (one flag per row: they
// agree), -1 for anything else.
int zero_flag(PyObject* masked) {
  const c10::string_view name = policy_name(masked);
  return name.empty() ? -1 : int(name == "zero");
}

// y where the operator's count of flagged rows, groups or channels is 0 (then taken() runs too), else None; the
// operators run without the GIL.
template <typename Call, typename Taken>
PyObject* run_unless_flagged(Call call, Taken taken) {
  at::Tensor y;
  {
    PyThreadState* saved = PyEval_SaveThread();
    try {
      auto [out, flagged] = call();
      if (flagged.template item<int64_t>() == 0) {
        y = std::move(out);
        taken();
      }
    } catch (...) {
      PyEval_RestoreThread(saved);
      throw;
    }
    PyEval_RestoreThread(saved);
  }
  if (!y.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(y));
}

// padded_rows(x, mask, weight, bias, ndims, eps, center, masked): mask None or one flag per token
// (x.shape[:-ndims]).
PyObject* padded_rows(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Inputs in;
  if (!inputs_of(args, nargs, 8, "padded_rows", &in)) Py_RETURN_NONE;
  const int64_t ndims = count_of(args[4]);
  const int zero = zero_flag(args[7]);
  const at::Tensor& x = in.x;
  if (zero < 0 || !PyBool_Check(args[6]) || ndims < 1 || ndims > x.dim() ||
      (in.mask && in.mask->sizes() != x.sizes().slice(0, x.dim() - ndims))) {
    Py_RETURN_NONE;
  }
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("masknorm::padded_rows_norm", "")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
          const c10::optional<at::Tensor>&, int64_t, double, bool, bool)>();
  return run_unless_flagged([&] {
    auto out = op.call(x, in.mask, in.weight, in.bias, ndims, in.eps, args[6] == Py_True, zero == 1);
    return std::make_tuple(std::get<0>(out), std::get<3>(out));
  }, [] {});
  END_HANDLE_TH_ERRORS
}

// masked_channels(x, mask, weight, bias, groups, eps, policy): for the shapes, groups and dtype that the
// caller's plan has checked. A call with nothing for autograd to record goes straight below autograd (its
// Autograd kernel would only pass it on).
PyObject* masked_channels(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Inputs in;
  if (!inputs_of(args, nargs, 7, "masked_channels", &in)) Py_RETURN_NONE;
  const int64_t groups = count_of(args[4]), policy = count_of(args[6]);
  if (groups < 1 || policy > 2 || policy < 0) Py_RETURN_NONE;
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("masknorm::masked_channels_norm", "")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
          const c10::optional<at::Tensor>&, int64_t, double, int64_t)>();
  const bool records = at::GradMode::is_enabled() && (in.x.requires_grad() ||
                                                      (in.weight && in.weight->requires_grad()) ||
                                                      (in.bias && in.bias->requires_grad()));
  return run_unless_flagged([&] {
    c10::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!records) below.emplace();
    auto out = op.call(in.x, in.mask, in.weight, in.bias, groups, in.eps, policy);
    return std::make_tuple(std::get<0>(out), std::get<4>(out));
  }, [] {});
  END_HANDLE_TH_ERRORS
}

// t (None or a tensor) as a contiguous plain CPU vector of n values of `dtype`.
bool channel_vector(const c10::optional<at::Tensor>& t, int64_t n, at::ScalarType dtype) {
  return !t || (t->dim() == 1 && t->size(0) == n && t->scalar_type() == dtype && t->is_contiguous());
}

// The running statistics a batch-norm module's update takes for x's C channels: all of running_mean,
// running_var, num_batches_tracked None (no update), or contiguous (C,) vectors of x's dtype, num_batches_tracked
// None or one int64 value, momentum None or a Python float.
struct Running {
  c10::optional<at::Tensor> mean, var, batches;
  c10::optional<double> momentum;
};

bool running_of(PyObject* const* args, const at::Tensor& x, Running* run) {
  const auto dtype = x.scalar_type();
  if (!(optional_tensor(args[0], dtype, &run->mean) && optional_tensor(args[1], dtype, &run->var) &&
        optional_tensor(args[2], at::kLong, &run->batches))) {
    return false;
  }
  if (!run->mean) return !run->var && !run->batches;
  if (args[3] != Py_None) {
    if (!PyFloat_CheckExact(args[3])) return false;
    run->momentum = PyFloat_AS_DOUBLE(args[3]);
  }
  const int64_t C = x.size(1);
  return run->var && channel_vector(run->mean, C, dtype) && channel_vector(run->var, C, dtype) &&
         (!run->batches || run->batches->numel() == 1);
}

// batch_channels(x, mask, weight, bias, masked, eps, running_mean, running_var, num_batches_tracked, momentum,
// max_numel, min_row): x (B, C, *S) of float32 or float64 whose size per_channel_norm takes (at most max_numel
// values, or rows x[b, c] of at least min_row), eps > 0, mask None or bool (B, *S), weight and bias None or (C,).
PyObject* batch_channels(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Inputs in;
  if (!inputs_of(args, nargs, 12, "batch_channels", &in)) Py_RETURN_NONE;
  const at::Tensor& x = in.x;
  const c10::string_view masked = policy_name(args[4]);
  const int64_t max_numel = count_of(args[10]), min_row = count_of(args[11]);
  Running run;
  const bool float_or_double = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  if (masked.empty() || in.eps <= 0.0 || x.dim() < 2 || !float_or_double || max_numel < 0 || min_row < 0 ||
      !running_of(args + 6, x, &run)) {
    Py_RETURN_NONE;
  }
  const int64_t C = x.size(1), numel = x.numel();
  const bool takes = numel <= max_numel || numel / (x.size(0) * C) >= min_row;
  const auto spatial = x.sizes().slice(2);
  const bool plain_mask = !in.mask || (in.mask->dim() == x.dim() - 1 && in.mask->size(0) == x.size(0) &&
                                       in.mask->sizes().slice(1) == spatial);
  if (!takes || !plain_mask || !channel_vector(in.weight, C, x.scalar_type()) ||
      !channel_vector(in.bias, C, x.scalar_type())) {
    Py_RETURN_NONE;
  }
  using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor>;
  static const auto norm = c10::Dispatcher::singleton()
      .findSchemaOrThrow("masknorm::per_channel_norm", "")
      .typed<Out(const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                 const c10::optional<at::Tensor>&, int64_t, double, c10::string_view)>();
  static const auto track = c10::Dispatcher::singleton()
      .findSchemaOrThrow("masknorm::per_channel_track", "")
      .typed<void(at::Tensor&, at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, c10::optional<double>)>();
  Out out;
  return run_unless_flagged([&] {
    out = norm.call(x, in.mask, in.weight, in.bias, 0, in.eps, masked);
    return std::make_tuple(std::get<0>(out), std::get<8>(out));
  }, [&] {
    if (run.mean) track.call(*run.mean, *run.var, run.batches, std::get<1>(out), std::get<2>(out), std::get<3>(out),
                             run.momentum);
  });
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"padded_rows", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&padded_rows)), METH_FASTCALL,
     "padded_rows(x, mask, weight, bias, ndims, eps, center, masked) -> y or None"},
    {"masked_channels", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&masked_channels)), METH_FASTCALL,
     "masked_channels(x, mask, weight, bias, groups, eps, policy) -> y or None"},
    {"batch_channels", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&batch_channels)), METH_FASTCALL,
     "batch_channels(x, mask, weight, bias, masked, eps, running_mean, running_var, num_batches_tracked, momentum, "
     "max_numel, min_row) -> y or None"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "masknorm_lanes", "The modules' lanes into the fused kernels.", -1,
                       kMethods};

}  // namespace

// The lanes as a module object; called through ctypes.PyDLL (with the GIL) once the library is loaded.
extern "C" __attribute__((visibility("default"))) PyObject* masknorm_lanes() {
  return PyModule_Create(&kModule);
}
