//! The cost model routes each collective to the channel it picks, identically on every rank,
//! against the real local S3 and DynamoDB servers (`scripts/services.sh`).
#![cfg(feature = "aws")]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

use fmi::model::Op as ModelOp;
use fmi::{Communicator, Config, EnvSettings, Op};

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: start the test servers with `eval \"$(scripts/services.sh start)\"`, \
             or run scripts/test.sh"
        )
    })
}

fn config_file(objective: &str) -> PathBuf {
    let s3 = service("FMI_TEST_S3_ENDPOINT");
    let dynamo = service("FMI_TEST_DYNAMODB_ENDPOINT");
    let text = format!(
        "channel = \"s3\"\n\
         [channels.s3]\nbucket = \"fmi-model-test\"\nendpoint = \"{s3}\"\nregion = \"us-east-1\"\n\
         [channels.dynamodb]\ntable = \"fmi-model-test\"\nendpoint = \"{dynamo}\"\nregion = \"us-east-1\"\n\
         [storage]\npoll_initial_ms = 2\npoll_max_ms = 50\n\
         [model]\nobjective = \"{objective}\"\n"
    );
    // One file per call: tests run in parallel and each removes its own files when done (two
    // tests sharing one name raced: one removed it while the other was reading it).
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "fmi-model-routing-{}-{}-{objective}.toml",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&path, text).expect("write config");
    path
}

/// Creates the bucket and table once at a time: s3s-fs answers two concurrent creations of one
/// bucket with an internal error.
async fn setup(config: &Config) {
    static SETUP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = SETUP.lock().await;
    fmi::storage::setup(config)
        .await
        .expect("create bucket and table");
}

fn puts(comm: &Communicator, channel: &str) -> u64 {
    comm.counters_by_channel()
        .into_iter()
        .find(|(name, _)| *name == channel)
        .and_then(|(_, c)| c.into_iter().find(|(k, _)| *k == "puts"))
        .map_or(0, |(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cheap_objective_sends_small_collectives_to_dynamodb_and_large_to_s3() {
    let path = config_file("cheap");
    let config = Config::from_file(&path).expect("config");
    setup(&config).await;
    let job = format!("model-{}", std::process::id());
    let n = 3u32;
    let ranks: Vec<_> = (0..n)
        .map(|r| {
            let mut s = EnvSettings::new(r, n, &job).expect("settings");
            s.config = Some(path.clone());
            tokio::spawn(async move {
                let comm = Communicator::from_settings(s).await.expect("join");
                let small_route = comm.channel_for(ModelOp::Allreduce, 8);
                let large_route = comm.channel_for(ModelOp::Allreduce, 64 << 10);
                let before = (puts(&comm, "dynamodb"), puts(&comm, "s3"));
                let small = comm
                    .allreduce(&[r as u64 + 1], Op::Sum)
                    .await
                    .expect("small");
                let mid = (puts(&comm, "dynamodb"), puts(&comm, "s3"));
                let large = comm
                    .allreduce(&vec![r as u64; 8 << 10], Op::Sum)
                    .await
                    .expect("large");
                let after = (puts(&comm, "dynamodb"), puts(&comm, "s3"));
                comm.barrier().await.expect("barrier");
                assert_eq!(small, vec![6]);
                assert!(large.iter().all(|&x| x == 3));
                (small_route, large_route, before, mid, after)
            })
        })
        .collect();
    let mut routes = Vec::new();
    for r in ranks {
        let (small_route, large_route, before, mid, after) = r.await.expect("rank");
        routes.push((small_route, large_route));
        assert!(mid.0 > before.0, "the 8 B allreduce wrote to dynamodb");
        assert_eq!(mid.1, before.1, "the 8 B allreduce did not touch s3");
        assert!(after.1 > mid.1, "the 64 KiB allreduce wrote to s3");
        assert_eq!(
            after.0, mid.0,
            "the 64 KiB allreduce did not touch dynamodb"
        );
    }
    assert!(
        routes.iter().all(|r| *r == ("dynamodb", "s3")),
        "every rank routes the same way: {routes:?}"
    );
    let left = fmi::storage::cleanup(&config, &fmi::JobId::new(job).unwrap())
        .await
        .expect("cleanup");
    assert_eq!(left, 0, "the job left objects behind");
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_with_different_models_fail_at_start() {
    let cheap = config_file("cheap");
    let fast = config_file("fast");
    let config = Config::from_file(&cheap).expect("config");
    setup(&config).await;
    let job = format!("model-mismatch-{}", std::process::id());
    let ranks: Vec<_> = [cheap.clone(), fast.clone()]
        .into_iter()
        .enumerate()
        .map(|(r, path)| {
            let mut s = EnvSettings::new(r as u32, 2, &job).expect("settings");
            s.config = Some(path);
            tokio::spawn(async move { Communicator::from_settings(s).await.map(|_| ()) })
        })
        .collect();
    for r in ranks {
        let e = r.await.expect("rank").expect_err("mismatched models");
        assert!(e.to_string().contains("different cost models"), "{e}");
    }
    let _ = fmi::storage::cleanup(&config, &fmi::JobId::new(job).unwrap()).await;
    let _ = std::fs::remove_file(cheap);
    let _ = std::fs::remove_file(fast);
}

fn counter(comm: &Communicator, channel: &str, name: &str) -> u64 {
    comm.counters_by_channel()
        .into_iter()
        .find(|(ch, _)| *ch == channel)
        .and_then(|(_, c)| c.into_iter().find(|(k, _)| *k == name))
        .map_or(0, |(_, v)| v)
}

/// A large broadcast goes mixed: the payload once into S3, the readiness token and the
/// acknowledgements over the push channel `signal` ("redis": blocking reads; "tcp": the direct
/// channel, through a rendezvous server of this test on loopback), so no receiver ever polls S3.
async fn large_bcast_stores_once_in_s3_and_signals_over(signal: &str) {
    use fmi::model::Algorithm;
    let redis = service("FMI_TEST_REDIS_URL");
    let s3 = service("FMI_TEST_S3_ENDPOINT");
    // The signal channel is declared slow for bulk data (1 MB/s), so that at 1 MiB the staged
    // broadcast (one S3 PUT, N−1 GETs) beats a binomial tree over it, while at 8 B it alone wins.
    // Over TCP, Redis is left out: configured, it would carry the whole broadcast itself.
    let (primary, expected) = match signal {
        "redis" => (
            format!("channel = \"redis\"\n[channels.redis]\nurl = \"{redis}\"\n"),
            Algorithm::StagedBcastRedis,
        ),
        _ => (String::new(), Algorithm::StagedBcastTcp),
    };
    let text = format!(
        "{primary}\
         [channels.s3]\nbucket = \"fmi-model-test\"\nendpoint = \"{s3}\"\nregion = \"us-east-1\"\n\
         [storage]\npoll_initial_ms = 2\npoll_max_ms = 50\n\
         [model]\nobjective = \"fast\"\n[model.{signal}]\nbandwidth_mb_per_sec = 1\n"
    );
    let path = std::env::temp_dir().join(format!(
        "fmi-model-staged-{signal}-{}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text).expect("write config");
    let config = Config::from_file(&path).expect("config");
    setup(&config).await;
    // TCP: ranks meet through a real rendezvous server on loopback, with a job token.
    let server = if signal == "tcp" {
        let s = fmi_rendezvous::Server::bind(
            "127.0.0.1:0".parse().expect("address"),
            fmi_rendezvous::ServerConfig::default(),
        )
        .await
        .expect("rendezvous server");
        Some(s.spawn())
    } else {
        None
    };
    let rendezvous = server.as_ref().map(|s| s.local_addr().to_string());
    let job = format!("model-staged-{signal}-{}", std::process::id());
    let n = 3u32;
    const LEN: usize = 1 << 20;
    let ranks: Vec<_> = (0..n)
        .map(|r| {
            let mut s = EnvSettings::new(r, n, &job).expect("settings");
            s.config = Some(path.clone());
            s.rendezvous = rendezvous.clone();
            s.token = rendezvous
                .as_ref()
                .map(|_| "model-staged-test-token-0123456789".to_owned());
            tokio::spawn(async move {
                let comm = Communicator::from_settings(s).await.expect("join");
                let large = comm.algorithm_for(ModelOp::Bcast, LEN);
                let small = comm.algorithm_for(ModelOp::Bcast, 8);
                let s3_before =
                    ["puts", "gets", "empty_gets", "deletes"].map(|k| counter(&comm, "s3", k));
                let mut buf: Vec<u8> = if r == 1 {
                    (0..LEN).map(|i| (i % 251) as u8).collect()
                } else {
                    vec![0; LEN]
                };
                comm.bcast_into(1, &mut buf).await.expect("staged bcast");
                assert!(buf.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
                let s3_after =
                    ["puts", "gets", "empty_gets", "deletes"].map(|k| counter(&comm, "s3", k));
                let mut tiny = [if r == 1 { 7u64 } else { 0 }];
                comm.bcast_into(1, &mut tiny).await.expect("small bcast");
                assert_eq!(tiny, [7]);
                let s3_end = counter(&comm, "s3", "puts");
                comm.barrier().await.expect("barrier");
                let delta: Vec<u64> = s3_after.iter().zip(s3_before).map(|(a, b)| a - b).collect();
                (large, small, delta, s3_end - s3_after[0])
            })
        })
        .collect();
    let mut total = vec![0u64; 4];
    for r in ranks {
        let (large, small, delta, small_puts) = r.await.expect("rank");
        assert_eq!(large, Some(expected), "1 MiB goes mixed over {signal}");
        assert!(
            small.is_some_and(|a| a.signal().is_none()),
            "8 B stays on one channel: {small:?}"
        );
        assert_eq!(small_puts, 0, "the 8 B bcast did not touch s3");
        for (t, d) in total.iter_mut().zip(delta) {
            *t += d;
        }
    }
    // Summed over the ranks: one PUT, one GET per receiver, not a single empty poll, one DELETE.
    assert_eq!(
        total,
        vec![1, u64::from(n) - 1, 0, 1],
        "puts, gets, empty_gets, deletes"
    );
    let left = fmi::storage::cleanup(&config, &fmi::JobId::new(job).unwrap())
        .await
        .expect("cleanup");
    assert_eq!(left, 0, "the job left objects behind");
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bcast_stores_once_in_s3_and_signals_over_redis() {
    large_bcast_stores_once_in_s3_and_signals_over("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bcast_stores_once_in_s3_and_signals_over_tcp() {
    large_bcast_stores_once_in_s3_and_signals_over("tcp").await;
}
