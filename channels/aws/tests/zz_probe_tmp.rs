#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use fmi_storage::Mailbox;
use std::time::{Duration, Instant};
fn med(mut v: Vec<Duration>) -> Duration { v.sort(); v[v.len()/2] }
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn probe_s3() {
    let mb = s3("probe").await;
    for size in [8usize, 65536, 1 << 20] {
        let data = payload(1, size);
        let (mut p, mut g, mut e, mut d) = (vec![], vec![], vec![], vec![]);
        for i in 0..15 {
            let k = format!("k{i}");
            let t = Instant::now(); mb.put(&k, &data).await.unwrap(); p.push(t.elapsed());
            let t = Instant::now(); mb.get(&k).await.unwrap().unwrap(); g.push(t.elapsed());
            let t = Instant::now(); assert!(mb.get("nope").await.unwrap().is_none()); e.push(t.elapsed());
            let t = Instant::now(); mb.delete(&[k]).await.unwrap(); d.push(t.elapsed());
        }
        eprintln!("s3 {size}: put {:?} get {:?} get404 {:?} delete {:?}", med(p), med(g), med(e), med(d));
    }
    clean(&mb, "").await;
}
