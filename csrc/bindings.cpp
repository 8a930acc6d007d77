// pybind11 bindings of the MAPA kernel: dtype dispatch, output allocation
// with the GIL held, the heavy loops with the GIL released. Validation
// happens in Python (mapa/_validation.py); this file re-checks only cheap
// invariants that would otherwise make the C++ read out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "mapa/kernel.hpp"
#include "mapa/tiles.hpp"

namespace py = pybind11;
using mapa::Args;
using mapa::Control;

namespace {

enum class Dtype { f32, f64 };

Dtype dtype_of(const py::array& a, const char* name) {
    if (a.ndim() != 2) throw py::value_error(std::string(name) + " must be 2-D");
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + " must be C-contiguous");
    if (a.dtype().is(py::dtype::of<float>())) return Dtype::f32;
    if (a.dtype().is(py::dtype::of<double>())) return Dtype::f64;
    throw py::type_error(std::string(name) + " must be float32 or float64");
}

Args make_args(const py::array& x, const py::array& y, double scale, bool exclude_self,
               std::int64_t block_size, int num_threads) {
    const Dtype dx = dtype_of(x, "X"), dy = dtype_of(y, "Y");
    if (dx != dy) throw py::type_error("X and Y must have the same dtype");
    if (x.shape(1) != y.shape(1)) throw py::value_error("X and Y must have the same number of columns");
    if (x.shape(0) < 1 || x.shape(1) < 1 || y.shape(0) < 1) throw py::value_error("empty input");
    if (exclude_self && (y.shape(0) != x.shape(0) || y.data() != x.data()))
        throw py::value_error("exclude_self requires Y to be X");
    if (!(scale > 0.0) || !std::isfinite(scale)) throw py::value_error("scale must be finite and > 0");
    if (block_size < 0) throw py::value_error("block_size must be >= 0");
    if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
    return Args{x.data(), x.shape(0), y.data(), y.shape(0), x.shape(1), scale, exclude_self,
                block_size, num_threads};
}

// Runs `kernel` without the GIL. Every ~100 ms the calling thread takes the
// GIL back to deliver pending signals (Ctrl-C raises KeyboardInterrupt within
// a block) and to report progress(done, total) when a callable was given.
template <class Kernel>
void run(const py::object& progress, Kernel kernel) {
    mapa::PollFn poll = [&progress](std::int64_t done, std::int64_t total) {
        py::gil_scoped_acquire gil;
        if (PyErr_CheckSignals() != 0) throw py::error_already_set();
        if (!progress.is_none()) progress(done, total);
        return true;
    };
    Control ctl(&poll);
    {
        py::gil_scoped_release nogil;
        kernel(ctl);
    }
    if (!progress.is_none()) progress(ctl.total(), ctl.total());
}

py::array log_normalizer(const py::array& x, const py::array& y, double scale, bool exclude_self,
                         std::int64_t block_size, int num_threads, const py::object& progress) {
    const Args a = make_args(x, y, scale, exclude_self, block_size, num_threads);
    if (dtype_of(x, "X") == Dtype::f32) {
        py::array_t<float> out(a.m);
        float* o = out.mutable_data();
        run(progress, [&](Control& c) { mapa::log_normalizer<float>(a, o, c); });
        return std::move(out);
    }
    py::array_t<double> out(a.m);
    double* o = out.mutable_data();
    run(progress, [&](Control& c) { mapa::log_normalizer<double>(a, o, c); });
    return std::move(out);
}

py::array log_posterior(const py::array& x, const py::array& y, double scale, bool exclude_self,
                        std::int64_t block_size, int num_threads, const py::object& progress) {
    const Args a = make_args(x, y, scale, exclude_self, block_size, num_threads);
    if (dtype_of(x, "X") == Dtype::f32) {
        py::array_t<float> out({a.m, a.n});
        float* o = out.mutable_data();
        run(progress, [&](Control& c) { mapa::log_posterior<float>(a, o, c); });
        return std::move(out);
    }
    py::array_t<double> out({a.m, a.n});
    double* o = out.mutable_data();
    run(progress, [&](Control& c) { mapa::log_posterior<double>(a, o, c); });
    return std::move(out);
}

template <class T>
py::tuple topk_typed(const Args& a, std::int64_t k, const py::object& progress) {
    py::array_t<std::int64_t> idx({a.m, k});
    py::array_t<T> logp({a.m, k});
    py::array_t<T> lnorm(a.m);
    std::int64_t* pi = idx.mutable_data();
    T* pl = logp.mutable_data();
    T* pn = lnorm.mutable_data();
    run(progress, [&](Control& c) { mapa::topk<T>(a, k, pi, pl, pn, c); });
    return py::make_tuple(idx, logp, lnorm);
}

py::tuple topk(const py::array& x, const py::array& y, double scale, std::int64_t k, bool exclude_self,
               std::int64_t block_size, int num_threads, const py::object& progress) {
    const Args a = make_args(x, y, scale, exclude_self, block_size, num_threads);
    const std::int64_t limit = exclude_self ? a.n - 1 : a.n;
    if (k < 1 || k > limit) throw py::value_error("k out of range");
    if (dtype_of(x, "X") == Dtype::f32) return topk_typed<float>(a, k, progress);
    return topk_typed<double>(a, k, progress);
}

py::tuple targets(const py::array& x, double scale, bool exclude_self, std::int64_t block_size,
                  int num_threads, const py::object& progress) {
    const Args a = make_args(x, x, scale, exclude_self, block_size, num_threads);
    if (exclude_self && a.n < 2) throw py::value_error("exclude_self needs at least 2 points");
    py::array_t<double> w(a.n), s1({a.n, a.d}), s2(a.n);
    double* pw = w.mutable_data();
    double* p1 = s1.mutable_data();
    double* p2 = s2.mutable_data();
    if (dtype_of(x, "X") == Dtype::f32)
        run(progress, [&](Control& c) { mapa::targets<float>(a, pw, p1, p2, c); });
    else
        run(progress, [&](Control& c) { mapa::targets<double>(a, pw, p1, p2, c); });
    return py::make_tuple(w, s1, s2);
}

py::dict build_info() {
    py::dict d;
    d["isa"] = mapa::selected_isa();
    d["vector_bytes"] = mapa::vector_bytes();
    d["cpu_vector_bytes"] = mapa::cpu_vector_bytes();
    d["openmp"] = mapa::have_openmp();
    d["openmp_version"] = mapa::openmp_version();
    d["max_threads"] = mapa::max_threads();
    d["direct_distance_max_features"] = mapa::kDirectMaxFeatures;
#if defined(__VERSION__)
    d["compiler"] = __VERSION__;
#endif
    return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "Compiled MAPA posterior kernel (C++/OpenMP); see mapa.backends for the contract.";
    m.def("log_normalizer", &log_normalizer, py::arg("X"), py::arg("Y"), py::arg("scale"),
          py::arg("exclude_self"), py::arg("block_size") = 0, py::arg("num_threads") = 1,
          py::arg("progress") = py::none());
    m.def("log_posterior", &log_posterior, py::arg("X"), py::arg("Y"), py::arg("scale"),
          py::arg("exclude_self"), py::arg("block_size") = 0, py::arg("num_threads") = 1,
          py::arg("progress") = py::none());
    m.def("topk", &topk, py::arg("X"), py::arg("Y"), py::arg("scale"), py::arg("k"),
          py::arg("exclude_self"), py::arg("block_size") = 0, py::arg("num_threads") = 1,
          py::arg("progress") = py::none());
    m.def("targets", &targets, py::arg("X"), py::arg("scale"), py::arg("exclude_self"),
          py::arg("block_size") = 0, py::arg("num_threads") = 1, py::arg("progress") = py::none());
    m.def("build_info", &build_info, "Which SIMD clone and threading this build uses.");
}
