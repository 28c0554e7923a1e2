use wgllm::loader::gguf::Gguf;
use wgllm::model::llama::{config_from_gguf, Llama, RunOptions};
use wgllm::model::source::Source;
use wgllm::tokenizer::{GgufVocab, Tokenizer};
fn main() -> anyhow::Result<()> {
    let path = wgllm::fetch::cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = Gguf::open(&path)?;
    let tok = Tokenizer::from_gguf(&GgufVocab::from_gguf(&g)?)?;
    let gpu = wgllm::Gpu::new(&Default::default())?;
    let (cfg, rot) = config_from_gguf(&g)?;
    let t = std::time::Instant::now();
    let mut m = Llama::load(
        &gpu,
        cfg,
        rot,
        &Source::Gguf(&g),
        RunOptions {
            ctx: 256,
            ..Default::default()
        },
    )?;
    eprintln!("load {:?}", t.elapsed());
    let mut ids = tok.encode("The capital of France is", true)?;
    eprintln!("{ids:?}");
    let t = std::time::Instant::now();
    let logits = m.forward(&gpu, &ids, 0)?;
    eprintln!("prefill {:?}", t.elapsed());
    let mut next = wgllm::sampler::argmax(&logits);
    let mut v: Vec<(usize, f32)> = logits.iter().cloned().enumerate().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    eprintln!("top5 {:?}", &v[..5]);
    m.profile = Some(Vec::new());
    for _ in 0..3 {
        ids.push(next);
        let t = std::time::Instant::now();
        let l = m.forward(&gpu, &[next], ids.len() - 1)?;
        eprintln!("tok {} {:?} {:?}", next, tok.decode(&[next])?, t.elapsed());
        next = wgllm::sampler::argmax(&l);
    }
    println!("{}", tok.decode(&ids)?);
    let prof = m.profile.take().unwrap();
    let mut by: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    for d in &prof {
        let e = by.entry(d.kernel.clone()).or_default();
        e.0 += d.nanos;
        e.1 += 1;
    }
    let tot: f64 = prof.iter().map(|d| d.nanos).sum();
    for (k, (ns, n)) in by {
        eprintln!("{k:50} {:8.1} ms {n}", ns / 1e6 / 3.0);
    }
    eprintln!(
        "total {:.1} ms/token over {} dispatches",
        tot / 1e6 / 3.0,
        prof.len() / 3
    );
    Ok(())
}
