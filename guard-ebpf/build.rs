//! Lets the code generator read packet fields as whole (possibly misaligned)
//! words instead of assembling them byte by byte: a fifth of the SYN path's
//! cost. The kernel accepts misaligned packet reads on architectures with
//! efficient unaligned access (x86-64, arm64); stack accesses must stay
//! aligned, and the verifier refuses the program at load time if one is not,
//! so the datapath tests catch any that slip in.
fn main() {
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
}
