//! The engine's memory estimates against what it really creates, and the refusal of calls
//! that cannot fit, before anything is allocated (on lavapipe in `cargo test`).

use super::engine::{Engine, FrameShape, Frames, GenerateParams, fixtures_dir};

fn load() -> Engine {
    let dir = fixtures_dir().join("model");
    let (cfg, w) = crate::weights::load_model(&dir)
        .unwrap_or_else(|e| panic!("fixture model {}: {e}", dir.display()));
    Engine::new(&cfg, &w).unwrap_or_else(|e| panic!("engine: {e}"))
}

fn params(t: usize, ratio: f32) -> GenerateParams {
    GenerateParams {
        gazing_ratio_each_frame: vec![ratio; t],
        task_loss_requirement: None,
    }
}

fn px_shape(b: usize, t: usize, h: usize, w: usize) -> FrameShape {
    FrameShape {
        b,
        t,
        h,
        w,
        src_hw: None,
    }
}

/// Bytes the engine's device created while `f` ran.
fn created(e: &Engine, f: impl FnOnce()) -> u64 {
    let before = e.context().allocated_bytes();
    f();
    e.context().allocated_bytes() - before
}

/// The estimate of every kind of call equals the bytes of the buffers the call creates
/// (each case has a new frame size, so each needs a new workspace), and a repeated call of
/// the same shape creates only its own readback buffers.
#[test]
fn memory_estimates_equal_the_buffers_created() {
    let e = load();
    let lut: Vec<f32> = (0..768).map(|i| (i % 256) as f32 / 255.0).collect();

    // generate: with the bicubic resize (32x32 pixel values) and without (224x224)
    for (b, t, hw, ratio) in [(1usize, 2usize, 32usize, 0.05f32), (2, 1, 224, 0.3)] {
        let s = px_shape(b, t, hw, hw);
        let px = vec![0.5f32; b * t * 3 * hw * hw];
        let est = e.estimate_generate(&s, &vec![ratio; t]).expect("estimate");
        let got = created(&e, || {
            e.generate(&px, &[b, t, 3, hw, hw], &params(t, ratio))
                .expect("generate");
        });
        assert_eq!(got, est.total, "generate {s:?}: {:?}", est.parts);
        let again = created(&e, || {
            e.generate(&px, &[b, t, 3, hw, hw], &params(t, ratio))
                .expect("generate");
        });
        assert_eq!(again, 0, "a repeated generate reuses its workspace");
    }

    // embed: the workspace plus its readback buffer
    let s = px_shape(2, 3, 40, 40);
    let px = vec![0.25f32; 2 * 3 * 3 * 40 * 40];
    let est = e.estimate_embed(&s).expect("estimate");
    let got = created(&e, || {
        e.embed(&px, &[2, 3, 3, 40, 40]).expect("embed");
    });
    assert_eq!(got, est.total, "embed: {:?}", est.parts);
    let staging = est
        .parts
        .iter()
        .find(|(k, _)| k == "embed readback")
        .expect("readback");
    assert_eq!(
        created(&e, || drop(e.embed(&px, &[2, 3, 3, 40, 40]))),
        staging.1
    );

    // score: the workspace plus its plans and readback
    let s = px_shape(1, 2, 48, 48);
    let px = vec![0.1f32; 2 * 3 * 48 * 48];
    let lens = [10usize, 3];
    let toks: Vec<u32> = (0..13).collect();
    let est = e.estimate_score(&s, &lens).expect("estimate");
    let got = created(&e, || {
        e.score(&px, &[1, 2, 3, 48, 48], &lens, &toks)
            .expect("score");
    });
    assert_eq!(got, est.total, "score: {:?}", est.parts);
    assert_eq!(e.estimate_score(&s, &[0, 0]).expect("no slots").total, 0);

    // uint8 frames through the GPU preprocessing: one pass (width only), two passes (the
    // intermediate rows), and to the model size (no bicubic buffer)
    for (src, out) in [
        ((30, 50), (30, 60)),
        ((50, 40), (36, 72)),
        ((300, 200), (224, 224)),
    ] {
        let (b, t) = (1usize, 2usize);
        let bytes = vec![7u8; b * t * src.0 * src.1 * 3];
        let frames = Frames::uint8(&bytes, &[b, t, src.0, src.1, 3], out, &lut).expect("frames");
        let est = e
            .estimate_generate(&frames.shape(), &[0.05; 2])
            .expect("estimate");
        let got = created(&e, || {
            e.generate_frames(&frames, &params(t, 0.05))
                .expect("generate");
        });
        assert_eq!(got, est.total, "uint8 {src:?} -> {out:?}: {:?}", est.parts);
    }

    // sessions (their own workspace), pixel values and uint8 frames
    for (hw, src) in [((36, 36), None), ((40, 44), Some((20, 30)))] {
        let est = e.estimate_session(2, 4, hw, src).expect("estimate");
        let got = created(&e, || {
            e.session(2, 4, hw, src, None).expect("session");
        });
        assert_eq!(got, est.total, "session {hw:?} {src:?}: {:?}", est.parts);
    }
}

/// A call or session far beyond the device's memory is refused with `Error::Device` naming
/// the estimate and the available bytes, before a single buffer is created; shapes whose
/// sizes overflow give an error, not a panic. The engine works afterwards.
#[test]
fn calls_that_cannot_fit_are_refused_before_allocating() {
    let e = load();
    let avail = e.memory_available();
    assert!(
        avail.device.heap_size.is_some(),
        "lavapipe is a Vulkan device: its heap size is known ({avail:?})"
    );
    let available = avail.bytes.expect("available bytes");
    // 64 rows of 100 000 frames: a KV cache of ~30 TiB, past the storage bindings too (that
    // refusal comes first, as allocating would give it)
    let est = e
        .estimate_session(64, 100_000, (224, 224), None)
        .expect("estimate");
    assert!(est.total > available, "{} <= {available}", est.total);
    let before = e.context().allocated_bytes();
    let Err(err) = e.session(64, 100_000, (224, 224), None, None) else {
        panic!("a session of ~30 TiB was created");
    };
    assert_eq!(
        e.context().allocated_bytes(),
        before,
        "nothing was allocated"
    );
    assert!(matches!(err, crate::Error::Device(_)), "{err}");
    assert!(err.to_string().contains("largest storage binding"), "{err}");

    // Within the bindings but past the device's memory (lavapipe's 128 MiB bindings keep
    // every call under its 2 GiB heap, so the free memory is simulated: 64 MiB): a
    // 64-frame session and an 8 x 8-frame generate (~190 MiB of KV cache each) are refused,
    // a small generate runs, and only it allocated.
    let sess = e
        .estimate_session(1, 64, (224, 224), None)
        .expect("estimate");
    let px = vec![0.5f32; 8 * 8 * 3 * 8 * 8];
    let big = e
        .estimate_generate(&px_shape(8, 8, 8, 8), &[1.0; 8])
        .expect("estimate");
    let small = e
        .estimate_generate(&px_shape(1, 1, 20, 20), &[0.05])
        .expect("estimate");
    e.context().simulate_free_device_memory(Some(64 << 20));
    let r = e.session(1, 64, (224, 224), None, None).map(|_| ());
    let g = e.generate(&px, &[8, 8, 3, 8, 8], &params(8, 1.0));
    let fits = e.generate(&px[..3 * 20 * 20], &[1, 1, 3, 20, 20], &params(1, 0.05));
    e.context().simulate_free_device_memory(None);
    fits.expect("a call within the memory runs");
    assert_eq!(e.context().allocated_bytes() - before, small.total);
    assert!(small.total < 64 << 20, "{}", small.total);
    for (r, est, what) in [(r, &sess, "session"), (g.map(|_| ()), &big, "generate")] {
        assert!(est.total > 64 << 20, "{what}: {}", est.total);
        let err = r.expect_err(what);
        assert!(matches!(err, crate::Error::Device(_)), "{what}: {err}");
        let msg = err.to_string();
        for want in [
            format!("needs {} bytes (", est.total),
            "of GPU memory (".into(),
            "KV cache (4 layers)".into(),
            "but only 67108864 bytes (64.0 MiB) are available on".into(),
            "(simulated)".into(),
        ] {
            assert!(msg.contains(&want), "{what}: `{want}` not in: {msg}");
        }
    }

    // estimates of shapes no memory holds: numbers or errors, never a panic
    // 4096 rows of 300 frames: a ~1.5 TiB KV cache (the frames do not fit one storage binding
    // either: the estimate counts them one frame per chunk, the call is refused by that)
    let g = e
        .estimate_generate(&px_shape(4096, 300, 8, 8), &[0.75; 300])
        .expect("estimate");
    assert!(g.total > 1 << 40, "{}", g.total);
    for s in [
        px_shape(usize::MAX, 1, 8, 8),
        px_shape(1, 1, usize::MAX, usize::MAX),
        FrameShape {
            src_hw: Some((usize::MAX, 3)),
            ..px_shape(1, 1, 8, 8)
        },
    ] {
        if let Ok(est) = e.estimate_embed(&s) {
            assert!(est.total > available, "{s:?}");
        }
    }
    assert!(e.estimate_session(1, usize::MAX, (8, 8), None).is_err());
    assert!(matches!(
        e.estimate_embed(&px_shape(1, 0, 8, 8)),
        Err(crate::Error::Input(_))
    ));
    assert!(matches!(
        e.estimate_generate(&px_shape(1, 2, 8, 8), &[0.5]),
        Err(crate::Error::Input(_))
    ));

    // still usable
    let px = vec![0.5f32; 3 * 32 * 32];
    e.generate(&px, &[1, 1, 3, 32, 32], &params(1, 0.05))
        .expect("generate after the refusal");
    println!(
        "device memory: {:?}; available for a call {available} bytes; weights {} bytes",
        avail.device, avail.weights
    );
}
