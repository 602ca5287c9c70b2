// Python bindings of the CPU ops: pointers arrive as integers (tensor.data_ptr()), so the extension
// never sees a torch type and one build serves every torch version. Argument checks live in Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "cpu/aio_engine.h"
#include "cpu/common.h"

namespace py = pybind11;
using dsk::active_table;

namespace {
template <class T> T* P(uintptr_t p) { return reinterpret_cast<T*>(p); }

py::list supported_isas() {
  py::list out;
  if (dsk::cpu_has_avx512()) out.append("avx512");
  if (dsk::cpu_has_avx2()) out.append("avx2");
  out.append("scalar");
  return out;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ds_kernels CPU ops (SIMD + OpenMP), raw-pointer interface";
  m.def("current_isa", [] { return std::string(dsk::active_isa()); });
  m.def("set_isa", [](const std::string& name) { dsk::set_isa(name.c_str()); });
  m.def("supported_isas", &supported_isas);

  m.def("adam_step", [](uintptr_t p, uintptr_t g, int gd, uintptr_t m1, uintptr_t m2, int sd, uintptr_t out, int od,
                        int64_t n, double lr, double b1, double b2, double eps, double wd, bool adamw,
                        double step_size, double bc2_rsqrt, int threads) {
    const double decay = (adamw && wd != 0.0) ? 1.0 - lr * wd : 1.0;
    dsk::AdamArgs a{P<float>(p), P<void>(g), gd, P<void>(m1), P<void>(m2), sd, P<void>(out), od, n,
                    float(b1), float(b2), float(1.0 - b1), float(1.0 - b2), float(eps), float(wd), float(decay),
                    adamw, float(step_size), float(bc2_rsqrt), threads};
    py::gil_scoped_release nogil;
    active_table().adam(a);
  });
  m.def("adagrad_step", [](uintptr_t p, uintptr_t g, int gd, uintptr_t v, uintptr_t out, int od, int64_t n,
                           float lr, float eps, float wd, int threads) {
    dsk::AdagradArgs a{P<float>(p), P<void>(g), gd, P<float>(v), P<void>(out), od, n, lr, eps, wd, threads};
    py::gil_scoped_release nogil;
    active_table().adagrad(a);
  });
  m.def("lion_step", [](uintptr_t p, uintptr_t g, int gd, uintptr_t m1, uintptr_t out, int od, int64_t n,
                        double lr, double b1, double b2, double wd, int threads) {
    const double decay = wd != 0.0 ? 1.0 - lr * wd : 1.0;
    dsk::LionArgs a{P<float>(p), P<void>(g), gd, P<float>(m1), P<void>(out), od, n, float(lr), float(b1),
                    float(b2), float(1.0 - b1), float(1.0 - b2), float(decay), threads};
    py::gil_scoped_release nogil;
    active_table().lion(a);
  });
  m.def("quantize", [](uintptr_t x, int xd, int64_t groups, int64_t gs, int bits, bool symmetric, uintptr_t q,
                       uintptr_t scale, uintptr_t zp, int threads) {
    dsk::QuantArgs a{P<void>(x), xd, groups, gs, bits, symmetric, P<void>(q), P<float>(scale), P<float>(zp), threads};
    py::gil_scoped_release nogil;
    active_table().quantize(a);
  });
  m.def("dequantize", [](uintptr_t q, int bits, uintptr_t scale, uintptr_t zp, int64_t groups, int64_t gs,
                         uintptr_t out, int od, int threads) {
    dsk::DequantArgs a{P<void>(q), bits, P<float>(scale), P<float>(zp), groups, gs, P<void>(out), od, threads};
    py::gil_scoped_release nogil;
    active_table().dequantize(a);
  });
  m.def("quantized_matmul", [](uintptr_t x, int64_t rows, int64_t k, uintptr_t q, int bits, uintptr_t scale,
                               uintptr_t zp, int64_t n, int64_t gs, uintptr_t bias, uintptr_t out, int threads) {
    dsk::QMatmulArgs a{P<float>(x), rows, k, P<void>(q), bits, P<float>(scale), P<float>(zp), n, gs,
                       P<float>(bias), P<float>(out), threads};
    py::gil_scoped_release nogil;
    active_table().qmatmul(a);
  });

  m.def("triad", [](uintptr_t a, uintptr_t b, uintptr_t c, float s, int64_t n, int threads) {
    dsk::TriadArgs t{P<float>(a), P<float>(b), P<float>(c), s, n, threads};
    py::gil_scoped_release nogil;
    active_table().triad(t);
  });

  m.def("io_uring_supported", &dsk::io_uring_supported);
  py::class_<dsk::AioEngine>(m, "AioEngine")
      .def(py::init<int64_t, int, int, const std::string&>(), py::arg("block_size"), py::arg("queue_depth"),
           py::arg("threads"), py::arg("engine"))
      .def_property_readonly("engine", &dsk::AioEngine::engine)
      .def("submit", &dsk::AioEngine::submit, py::call_guard<py::gil_scoped_release>())
      .def("wait", &dsk::AioEngine::wait, py::call_guard<py::gil_scoped_release>())
      .def("poll", &dsk::AioEngine::poll, py::call_guard<py::gil_scoped_release>());
}
