//! `--dtype`: every attention method trains in bf16 (its own process: a device's float dtype
//! is set once, before its first tensor, for the whole process), and bad values are errors
//! naming the flag.

mod common;

use burn::tensor::{DType, FloatDType};
use common::tiny;
use toy_lm::config::Method;
use toy_lm::device::{parse_dtype, select_device_with};
use toy_lm::train::{RunOptions, train};

#[test]
fn every_method_trains_in_bf16_and_bad_dtypes_are_named() {
    assert!(parse_dtype(Some("fp8")).unwrap_err().to_string().contains("--dtype"));
    assert_eq!(parse_dtype(None).unwrap(), FloatDType::F32);
    let (_, device) = select_device_with(Some("flex"), parse_dtype(Some("bf16")).unwrap()).unwrap();
    for method in Method::ALL {
        let mut c = tiny(method, 2);
        c.model.layers = 1;
        let out = std::env::temp_dir().join(format!("toy-lm-dtype-{}-{}", std::process::id(), method.name()));
        let opts = RunOptions { device: device.clone(), devices: Vec::new(), out: out.clone(), resume: None, init_from: None, log_prefix: String::new() };
        let r = train(&c, &opts).unwrap_or_else(|e| panic!("{method} in bf16: {e}"));
        assert!(r.losses.iter().all(|l| l.is_finite()), "{method}: {:?}", r.losses);
        std::fs::remove_dir_all(&out).ok();
    }
    assert_eq!(burn::tensor::Tensor::<1>::zeros([1], &device).dtype(), DType::BF16, "the device's default float dtype");
}
