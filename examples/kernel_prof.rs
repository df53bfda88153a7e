//! Times the kernels on the shapes of the default model (f32, 2048-token windows).
//! `cargo run --release --example kernel_prof`
use lopper::kernels::{self, attention::AttnDims};
use std::time::Instant;
fn t<F: FnMut()>(name: &str, flops: f64, mut f: F) {
    f();
    let n = 3;
    let s = Instant::now();
    for _ in 0..n {
        f();
    }
    let dt = s.elapsed().as_secs_f64() / n as f64;
    println!(
        "{name:30} {:8.2} ms  {:7.1} GFLOP/s",
        dt * 1e3,
        flops / dt / 1e9
    );
}
fn main() {
    let m = 2048;
    let x = vec![0.01f32; m * 1536];
    let w = vec![0.02f32; 1536 * 1536];
    let mut out = vec![0f32; m * 1536];
    for (k, n) in [(576, 576), (576, 192), (576, 1536), (1536, 576)] {
        t(
            &format!("matmul {m}x{k}x{n}"),
            2.0 * (m * k * n) as f64,
            || kernels::matmul_t(&x, &w, &mut out, m, k, n, false),
        );
    }
    let d = AttnDims {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let q = vec![0.1f32; m * 576];
    let kk = vec![0.1f32; m * 192];
    let v = vec![0.1f32; m * 192];
    let mut o = vec![0f32; m * 576];
    t(
        "attention 2048",
        4.0 * 576.0 * (m * (m + 1) / 2) as f64,
        || kernels::causal_attention(&q, &kk, &v, &mut o, m, m, d, 0.125),
    );
    let wn = vec![1f32; 576];
    t("rmsnorm", 0.0, || kernels::rmsnorm(&q, &wn, 1e-5, &mut o));
    let mut g = vec![0.1f32; m * 1536];
    t("silu_mul", 0.0, || kernels::silu_mul(&mut g, &x));
    let lm = vec![0.01f32; 49152 * 576];
    let mut lg = vec![0f32; 128 * 49152];
    let mut lg2 = vec![0f32; 512 * 49152];
    t("lm head 512 rows", 2.0 * 512.0 * 576.0 * 49152.0, || {
        kernels::matmul_t(&x, &lm, &mut lg2, 512, 576, 49152, false)
    });
    t("lm head 128 rows", 2.0 * 128.0 * 576.0 * 49152.0, || {
        kernels::matmul_t(&x, &lm, &mut lg, 128, 576, 49152, false)
    });
    let mut e = lg.clone();
    t("exp_slice 6.3M", 0.0, || kernels::exp_slice(&mut e));
    t("logsumexp_naive 1 row", 0.0, || {
        std::hint::black_box(kernels::logsumexp_naive(&lg[..49152]));
    });
    t("logsumexp 128 rows", 0.0, || {
        let s: f64 = lg.chunks(49152).map(kernels::logsumexp).sum();
        std::hint::black_box(s);
    });
}
