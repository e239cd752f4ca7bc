//! Predicted time, requests and dollars of one operation with one algorithm on one channel.
//!
//! An algorithm is a list of steps; in a step some ranks each send one message (groups of
//! `count` messages of `bytes` bytes) and the step lasts as long as its slowest message. Every
//! formula works in O(log p) (ring steps repeat), so the model is cheap enough to consult on
//! every call.

use crate::ops::{Algorithm, Op};
use crate::params::{ChannelKind, ChannelParams, ModelConfig, HEADER_BYTES};
use crate::requests::Requests;
use crate::units::{Bytes, Dollars, Seconds};

/// What one (channel, algorithm) is predicted to cost for one operation, summed over all ranks.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Estimate {
    /// The channel.
    pub channel: ChannelKind,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Time from the start of the operation until the last rank is done.
    pub seconds: Seconds,
    /// Everything the operation costs: `request_dollars + time_dollars`.
    pub dollars: Dollars,
    /// The requests' price (per-request prices and capacity units).
    pub request_dollars: Dollars,
    /// The time-based price: the functions' GB-seconds while they wait plus the channel's
    /// amortised instance.
    pub time_dollars: Dollars,
    /// The requests the model expects, in the counters' vocabulary (all ranks together).
    pub requests: Requests,
}

/// Whether `algorithm` can run `op` on `channel` under `config` (storage-native forms need a
/// storage channel with counters and the adapter's switch on).
pub fn applicable(
    config: &ModelConfig,
    channel: ChannelKind,
    op: Op,
    algorithm: Algorithm,
) -> bool {
    let p = config.params(channel);
    let native_bcast = channel.is_storage() && p.has_native_bcast();
    let native_barrier = channel.is_storage() && p.has_native_barrier();
    op.algorithms().contains(&algorithm)
        && match algorithm {
            Algorithm::NativeBcast => native_bcast,
            Algorithm::CounterBarrier => native_barrier,
            // Where the channel offers its native form, the collectives run it for every call
            // (fmi_collectives::bcast, ::barrier): the message-based forms never execute there.
            Algorithm::Binomial | Algorithm::ScatterAllgather if op == Op::Bcast => !native_bcast,
            Algorithm::Dissemination => !native_barrier,
            // The mixed broadcast stores its payload in S3 (the channel without counters or
            // blocking reads, where avoiding polls matters); the signal channel must be one of
            // the job's channels too, which `estimates` checks.
            Algorithm::StagedBcastTcp | Algorithm::StagedBcastRedis => channel == ChannelKind::S3,
            _ => true,
        }
}

/// The prediction for `op` on `bytes` over `ranks` ranks with `algorithm` on `channel`, or
/// `None` when the algorithm does not apply (see [`applicable`]) or `ranks` is 0.
pub fn estimate(
    config: &ModelConfig,
    channel: ChannelKind,
    op: Op,
    algorithm: Algorithm,
    bytes: Bytes,
    ranks: u32,
) -> Option<Estimate> {
    if ranks == 0 || !applicable(config, channel, op, algorithm) {
        return None;
    }
    if let Some(signal) = algorithm.signal() {
        return staged_bcast(config, channel, signal, algorithm, bytes.0, ranks);
    }
    let params = config.params(channel);
    let ch = Chan {
        kind: channel,
        p: params,
    };
    let p = u64::from(ranks);
    let n = if op.has_data() { bytes.0 } else { 0 };
    let (seconds, requests) = match algorithm {
        Algorithm::NativeBcast => ch.native_bcast(n, p),
        Algorithm::CounterBarrier => ch.counter_barrier(p),
        a => ch.run(&steps(op, a, n, p), config.gamma.0),
    };
    // Only the two ends of a point-to-point message wait for it; every rank waits in a
    // collective.
    let waiting = if op == Op::Send { p.min(2) } else { p };
    let time_dollars = Dollars(
        seconds * waiting as f64 * config.function_usd_per_second()
            + seconds * params.prices.instance_per_hour.0 / 3600.0,
    );
    let request_dollars = requests.dollars(&params.prices);
    Some(Estimate {
        channel,
        algorithm,
        seconds: Seconds(seconds),
        dollars: request_dollars + time_dollars,
        request_dollars,
        time_dollars,
        requests,
    })
}

/// The mixed-channel broadcast of `n` bytes: the root stores the payload as one value on
/// `payload` (no chunk header, so it must fit one value below the multipart threshold), then
/// broadcasts an 8-byte readiness token over `signal` (binomial); every receiver reads the
/// value once (it is there: no empty polls) and sends an 8-byte acknowledgement to the root over
/// `signal`; the root reads them one after the other and deletes the value.
///
/// `requests` are the payload channel's (1 PUT, N−1 GETs, 1 DELETE); the signal channel's
/// requests are priced into `request_dollars`, and both channels' instances into
/// `time_dollars`.
fn staged_bcast(
    config: &ModelConfig,
    payload: ChannelKind,
    signal: ChannelKind,
    algorithm: Algorithm,
    n: u64,
    ranks: u32,
) -> Option<Estimate> {
    let params = config.params(payload);
    let sig_params = config.params(signal);
    let ch = Chan {
        kind: payload,
        p: params,
    };
    let p = u64::from(ranks);
    if p <= 1
        || !payload.is_storage()
        || signal == payload
        || !sig_params.push
        || matches!(params.max_chunk, Some(m) if n > m.0)
        || ch.multipart(n)
    {
        return None;
    }
    // The token is an ordinary broadcast on the signal channel: its native form where it has
    // one (that is what the collectives run there), else a binomial tree.
    let token_algorithm = if applicable(config, signal, Op::Bcast, Algorithm::NativeBcast) {
        Algorithm::NativeBcast
    } else {
        Algorithm::Binomial
    };
    let token = estimate(config, signal, Op::Bcast, token_algorithm, Bytes(8), ranks)?;
    let ack = estimate(
        config,
        signal,
        Op::Send,
        Algorithm::PointToPoint,
        Bytes(8),
        2,
    )?;
    let rho = params.request.0;
    let write = rho + ch.half_transfer(n);
    let read = rho + ch.half_transfer(n);
    // The acknowledgements travel at once; the root reads them one after the other.
    let acks = ack.seconds.0 + (p - 2) as f64 * sig_params.request.0;
    let seconds = write + token.seconds.0 + read + acks + rho;
    let mut requests = ch.put(n);
    requests += ch.peek_found(n).times(p - 1);
    requests += ch.delete(&[(1, n)]);
    let signal_requests = token.requests + ack.requests.times(p - 1);
    let request_dollars =
        requests.dollars(&params.prices) + signal_requests.dollars(&sig_params.prices);
    let time_dollars = Dollars(
        seconds * p as f64 * config.function_usd_per_second()
            + seconds * (params.prices.instance_per_hour.0 + sig_params.prices.instance_per_hour.0)
                / 3600.0,
    );
    Some(Estimate {
        channel: payload,
        algorithm,
        seconds: Seconds(seconds),
        dollars: request_dollars + time_dollars,
        request_dollars,
        time_dollars,
        requests,
    })
}

/// Since when the receivers of a step have been waiting (polling).
#[derive(Clone, Copy, Debug)]
enum Since {
    /// They start waiting when the step starts (exchanges: every rank sends and receives).
    Now,
    /// Since the operation started (tree receivers post their receive at once).
    OpStart,
    /// Since step `k` of the list started.
    Step(usize),
}

#[derive(Clone, Debug)]
struct Step {
    /// `(count, bytes)`: `count` messages of `bytes` bytes each, sent concurrently.
    groups: [(u64, u64); 2],
    since: Since,
    /// Bytes reduced on the critical path after the step (γ each).
    reduce: u64,
    /// The step happens this many times in a row (ring rounds).
    repeat: u64,
    /// Every rank of the step sends and receives at once (it pays `exchange_extra`).
    exchange: bool,
}

impl Step {
    fn new(count: u64, bytes: u64) -> Step {
        Step {
            groups: [(count, bytes), (0, 0)],
            since: Since::Now,
            reduce: 0,
            repeat: 1,
            exchange: false,
        }
    }
    /// Marks an exchange: each participating rank sends one message and receives one.
    fn exchange(mut self) -> Step {
        self.exchange = true;
        self
    }
    fn since(mut self, s: Since) -> Step {
        self.since = s;
        self
    }
    fn reduce(mut self, b: u64) -> Step {
        self.reduce = b;
        self
    }
    fn repeat(mut self, r: u64) -> Step {
        self.repeat = r;
        self
    }
}

fn ceil_log2(p: u64) -> u32 {
    if p <= 1 {
        0
    } else {
        64 - (p - 1).leading_zeros()
    }
}

fn floor_log2(p: u64) -> u32 {
    63 - p.max(1).leading_zeros()
}

/// ⌈a·b / c⌉ without overflow.
fn mul_div_ceil(a: u64, b: u64, c: u64) -> u64 {
    let r = (u128::from(a) * u128::from(b)).div_ceil(u128::from(c.max(1)));
    u64::try_from(r).unwrap_or(u64::MAX)
}

/// The senders of one binomial-tree round at distance `m` among `p` ranks: ranks `k·2m` send to
/// `k·2m + m` (scatter, bcast) or the reverse (gather, reduce), carrying the blocks of the
/// subtree `[k·2m + m, min(k·2m + 2m, p))`. Groups `(count, blocks)`.
fn tree_round(p: u64, m: u64) -> [(u64, u64); 2] {
    let full = p / (2 * m);
    let last = full * 2 * m + m;
    let partial = if last < p { (1, p - last) } else { (0, 0) };
    [(full, m), partial]
}

/// Distances of the binomial rounds, nearest first: 1, 2, 4, … < p.
fn distances(p: u64) -> Vec<u64> {
    (0..ceil_log2(p)).map(|j| 1u64 << j).collect()
}

/// Ranks in `[0, x)` with bit `j` set.
fn with_bit(x: u64, j: u32) -> u64 {
    let period = 1u64 << (j + 1);
    let half = 1u64 << j;
    (x / period) * half + (x % period).saturating_sub(half)
}

fn tree_steps(p: u64, n: u64, scatter_like: bool, whole: bool, reduce: bool) -> Vec<Step> {
    let mut ds = distances(p);
    if scatter_like {
        ds.reverse();
    }
    ds.into_iter()
        .map(|m| {
            let g = tree_round(p, m);
            let bytes = |blocks: u64| {
                if whole {
                    n
                } else {
                    mul_div_ceil(n, blocks, p)
                }
            };
            Step {
                groups: [(g[0].0, bytes(g[0].1)), (g[1].0, bytes(g[1].1))],
                since: if scatter_like {
                    Since::OpStart
                } else {
                    Since::Now
                },
                reduce: if reduce { n } else { 0 },
                repeat: 1,
                exchange: false,
            }
        })
        .collect()
}

/// The steps of `algorithm` for `op` on `n` bytes over `p` ranks (not the native forms).
fn steps(op: Op, algorithm: Algorithm, n: u64, p: u64) -> Vec<Step> {
    use Algorithm::*;
    if op == Op::Send {
        return vec![Step::new(1, n)];
    }
    if p <= 1 {
        return Vec::new();
    }
    let pof2 = 1u64 << floor_log2(p);
    let rem = p - pof2;
    let lg2 = u64::from(floor_log2(p));
    let block = n.div_ceil(p);
    let mut s = Vec::new();
    match (op, algorithm) {
        (Op::Barrier, _) => s.push(Step::new(p, 0).exchange().repeat(u64::from(ceil_log2(p)))),
        (Op::Bcast, ScatterAllgather) => {
            s = tree_steps(p, n, true, false, false);
            s.push(Step::new(p, block).repeat(p - 1));
        }
        (Op::Bcast, _) => s = tree_steps(p, n, true, true, false),
        (Op::Scatter, _) => s = tree_steps(p, n, true, false, false),
        (Op::Gather, _) => s = tree_steps(p, n, false, false, false),
        (Op::Reduce, _) => s = tree_steps(p, n, false, true, true),
        (Op::Allreduce, RecursiveDoubling) => {
            if rem > 0 {
                s.push(Step::new(rem, n).reduce(n));
            }
            s.push(Step::new(pof2, n).reduce(n).exchange().repeat(lg2));
            if rem > 0 {
                s.push(Step::new(rem, n).since(Since::Step(1)));
            }
        }
        (Op::Allreduce, Rabenseifner) => {
            if rem > 0 {
                s.push(Step::new(rem, n).reduce(n));
            }
            for j in 1..=lg2 {
                let b = n.div_ceil(1u64 << j);
                s.push(Step::new(pof2, b).reduce(b).exchange());
            }
            for j in (1..=lg2).rev() {
                s.push(Step::new(pof2, n.div_ceil(1u64 << j)).exchange());
            }
            if rem > 0 {
                s.push(Step::new(rem, n).since(Since::Step(1)));
            }
        }
        (Op::Allreduce, _) => {
            s.push(Step::new(p, block).reduce(block).exchange().repeat(p - 1));
            s.push(Step::new(p, block).exchange().repeat(p - 1));
        }
        (Op::Allgather, RecursiveDoubling) => {
            if rem > 0 {
                s.push(Step::new(rem, block));
            }
            for j in 0..lg2 {
                s.push(Step::new(pof2, mul_div_ceil(n, 1u64 << j, pof2)).exchange());
            }
            if rem > 0 {
                s.push(Step::new(rem, n).since(Since::Step(1)));
            }
        }
        (Op::Allgather, _) | (Op::Alltoall, _) => {
            s.push(Step::new(p, block).exchange().repeat(p - 1))
        }
        (Op::ReduceScatter, Ring) => {
            s.push(Step::new(p, block).reduce(block).exchange().repeat(p - 1))
        }
        (Op::ReduceScatter, _) => {
            s = tree_steps(p, n, false, true, true);
            s.extend(tree_steps(p, n, true, false, false));
        }
        (Op::Scan, _) => {
            for j in 0..ceil_log2(p) {
                let mask = 1u64 << j;
                let count = with_bit(p, j)
                    + if p > mask {
                        (p - mask) - with_bit(p - mask, j)
                    } else {
                        0
                    };
                s.push(Step::new(count, n).reduce(2 * n));
            }
        }
        (Op::Send, _) => {}
    }
    s
}

/// How a message of `n` bytes is cut into stored values (chunk 0 carries the 13-byte header).
#[derive(Clone, Copy, Debug)]
struct Chunks {
    count: u64,
    /// Chunks of exactly `max` bytes.
    full: u64,
    max: u64,
    /// Size of the one remaining chunk (0: none).
    tail: u64,
}

impl Chunks {
    fn new(n: u64, max: Option<Bytes>) -> Chunks {
        let stored = n.saturating_add(HEADER_BYTES);
        match max {
            Some(Bytes(max)) if stored > max => {
                let rest = n - (max - HEADER_BYTES);
                let full = 1 + rest / max;
                let tail = rest % max;
                Chunks {
                    count: full + u64::from(tail > 0),
                    full,
                    max,
                    tail,
                }
            }
            _ => Chunks {
                count: 1,
                full: 0,
                max: stored,
                tail: stored,
            },
        }
    }

    /// `(count, size)` groups.
    fn groups(&self) -> [(u64, u64); 2] {
        [(self.full, self.max), (u64::from(self.tail > 0), self.tail)]
    }

    fn largest(&self) -> u64 {
        if self.full > 0 {
            self.max
        } else {
            self.tail
        }
    }
}

struct Chan<'a> {
    kind: ChannelKind,
    p: &'a ChannelParams,
}

impl Chan<'_> {
    fn dynamo(&self) -> bool {
        self.kind == ChannelKind::DynamoDb
    }

    fn write_units(&self, size: u64) -> u64 {
        if self.dynamo() {
            (size + self.p.item_overhead.0)
                .div_ceil(self.p.prices.write_unit.0)
                .max(1)
        } else {
            0
        }
    }

    fn read_units(&self, size: u64) -> u64 {
        if self.dynamo() {
            (size + self.p.item_overhead.0)
                .div_ceil(self.p.prices.read_unit.0)
                .max(1)
        } else {
            0
        }
    }

    fn multipart(&self, size: u64) -> bool {
        self.kind == ChannelKind::S3 && matches!(self.p.multipart_threshold, Some(t) if size > t.0)
    }

    /// Requests of writing one value of `size` bytes.
    fn put(&self, size: u64) -> Requests {
        let puts = if self.multipart(size) {
            size.div_ceil(self.p.part_size.0) + 2
        } else {
            1
        };
        Requests {
            puts,
            bytes_put: size,
            write_units: self.write_units(size),
            ..Requests::NONE
        }
    }

    /// A destructive read that found `size` bytes (S3, Redis: read + delete; DynamoDB: one
    /// DeleteItem returning the item, billed as a write).
    fn take_found(&self, size: u64) -> Requests {
        Requests {
            gets: 1,
            bytes_got: size,
            deletes: u64::from(!self.dynamo()),
            write_units: self.write_units(size),
            ..Requests::NONE
        }
    }

    fn take_empty(&self) -> Requests {
        Requests {
            gets: 1,
            empty_gets: 1,
            write_units: u64::from(self.dynamo()),
            ..Requests::NONE
        }
    }

    fn peek_found(&self, size: u64) -> Requests {
        Requests {
            gets: 1,
            bytes_got: size,
            read_units: self.read_units(size),
            ..Requests::NONE
        }
    }

    fn peek_empty(&self) -> Requests {
        Requests {
            gets: 1,
            empty_gets: 1,
            read_units: u64::from(self.dynamo()),
            ..Requests::NONE
        }
    }

    fn counter(&self) -> Requests {
        Requests {
            counters: 1,
            write_units: self.write_units(8),
            ..Requests::NONE
        }
    }

    /// One batch delete of these values (AWS bills a DynamoDB delete by the item's size).
    fn delete(&self, groups: &[(u64, u64)]) -> Requests {
        let keys: u64 = groups.iter().map(|g| g.0).sum();
        let batch = match self.kind {
            ChannelKind::DynamoDb => 25,
            ChannelKind::S3 => 1000,
            _ => u64::MAX,
        };
        Requests {
            deletes: keys.div_ceil(batch),
            write_units: groups
                .iter()
                .map(|&(c, s)| c.saturating_mul(self.write_units(s)))
                .sum(),
            ..Requests::NONE
        }
    }

    fn half_transfer(&self, n: u64) -> f64 {
        self.p.beta.0 * n as f64 / 2.0
    }

    /// Time until the writer has stored every chunk (chunks 1.. in waves of `put_concurrency`,
    /// then chunk 0), and the requests.
    fn write(&self, n: u64, chunks: &Chunks) -> (f64, Requests) {
        let rho = self.p.request.0;
        let waves = (chunks.count - 1).div_ceil(u64::from(self.p.put_concurrency)) + 1;
        let largest = chunks.largest();
        let per_wave = if self.multipart(largest) {
            // create + complete, parts four at a time.
            let parts = largest.div_ceil(self.p.part_size.0);
            rho * (3.0 + (parts.div_ceil(4) - 1) as f64)
        } else {
            rho
        };
        let mut req = Requests::NONE;
        for (c, s) in chunks.groups() {
            req += self.put(s).times(c);
        }
        (waves as f64 * per_wave + self.half_transfer(n), req)
    }

    /// When a receiver that started polling `waited` seconds before the step notices a value
    /// stored `ready` seconds into the step: (seconds into the step, empty polls). Polls start
    /// at once, then pause `poll_initial`, doubling up to `poll_max`; each empty poll itself
    /// takes `request`.
    fn notice(&self, waited: f64, ready: f64) -> (f64, u64) {
        if self.p.push {
            return (ready, 0);
        }
        let target = waited + ready;
        let rho = self.p.request.0;
        let pmax = self.p.poll_max.0;
        let mut at = 0.0;
        let mut pause = self.p.poll_initial.0;
        let mut empty: u64 = 0;
        // Bounded: the pause doubles (from >= 1 µs) until it reaches poll_max (<= 1 h).
        while at < target {
            if pause >= pmax {
                let period = rho + pmax;
                let m = ((target - at) / period).ceil();
                at += m * period;
                empty = empty.saturating_add(m as u64);
                break;
            }
            at += rho + pause;
            pause = (pause * 2.0).min(pmax);
            empty += 1;
        }
        ((at - waited).max(ready), empty)
    }

    /// One point-to-point message of `n` bytes whose receiver has been waiting `waited` seconds
    /// when the sender starts.
    fn message(&self, n: u64, waited: f64) -> (f64, Requests) {
        if !self.kind.is_storage() {
            return (self.p.alpha.0 + self.p.beta.0 * n as f64, Requests::NONE);
        }
        let chunks = Chunks::new(n, self.p.max_chunk);
        let (ready, mut req) = self.write(n, &chunks);
        let (seen, empty) = self.notice(waited, ready);
        let read = chunks.count as f64 * self.p.request.0 + self.half_transfer(n);
        for (c, s) in chunks.groups() {
            req += self.take_found(s).times(c);
        }
        req += self.take_empty().times(empty);
        (seen + read, req)
    }

    fn run(&self, steps: &[Step], gamma: f64) -> (f64, Requests) {
        let mut t = 0.0;
        let mut starts = Vec::with_capacity(steps.len());
        let mut total = Requests::NONE;
        for step in steps {
            starts.push(t);
            let waited = match step.since {
                Since::Now => 0.0,
                Since::OpStart => t,
                Since::Step(k) => t - starts.get(k).copied().unwrap_or(t),
            };
            let mut longest: f64 = 0.0;
            let mut volume = 0.0;
            let mut req = Requests::NONE;
            for &(count, bytes) in &step.groups {
                if count == 0 {
                    continue;
                }
                let (s, r) = self.message(bytes, waited);
                longest = longest.max(s);
                req += r.times(count);
                volume += count as f64 * bytes as f64;
            }
            if longest == 0.0 && req.is_empty() {
                continue;
            }
            let extra = if step.exchange {
                self.p.exchange_extra.0
            } else {
                0.0
            };
            let step_time =
                longest.max(self.p.aggregate_beta.0 * volume) + extra + gamma * step.reduce as f64;
            t += step_time * step.repeat as f64;
            total += req.times(step.repeat);
        }
        (t, total)
    }

    /// The storage-native broadcast: the root stores the message once, the other p−1 ranks
    /// read it (polling where the channel polls), count themselves on a counter, and the last
    /// deletes the object and the counter.
    fn native_bcast(&self, n: u64, p: u64) -> (f64, Requests) {
        if p <= 1 {
            return (0.0, Requests::NONE);
        }
        let readers = p - 1;
        let rho = self.p.request.0;
        let chunks = Chunks::new(n, self.p.max_chunk);
        let (ready, mut req) = self.write(n, &chunks);
        let (seen, empty) = self.notice(0.0, ready);
        let read = chunks.count as f64 * rho + self.half_transfer(n);
        let shared = ready + self.p.aggregate_beta.0 * (readers as f64 * n as f64);
        let t = (seen + read).max(shared) + 2.0 * rho;
        let mut each = self.counter() + self.peek_empty().times(empty);
        for (c, s) in chunks.groups() {
            each += self.peek_found(s).times(c);
        }
        req += each.times(readers);
        let mut keys = chunks.groups().to_vec();
        keys.push((1, 8));
        req += self.delete(&keys);
        (t, req)
    }

    /// The counter barrier: every rank increments a counter, the last writes a release flag the
    /// others wait for, a second increment elects who deletes both.
    fn counter_barrier(&self, p: u64) -> (f64, Requests) {
        if p <= 1 {
            return (0.0, Requests::NONE);
        }
        let rho = self.p.request.0;
        // Waiters start looking after their increment (rho); the flag is there at 2 rho.
        let (seen, empty) = self.notice(0.0, rho);
        let t = rho + seen + 3.0 * rho;
        let waiters = p - 1;
        let req = self.counter().times(2 * p - 1)
            + self.put(0)
            + (self.peek_found(0) + self.peek_empty().times(empty)).times(waiters)
            + self.delete(&[(1, 0), (1, 8)]);
        (t, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(ch: ChannelKind, op: Op, a: Algorithm, n: u64, p: u32) -> Estimate {
        estimate(&ModelConfig::default(), ch, op, a, Bytes(n), p).unwrap()
    }

    #[test]
    fn exchange_extra_is_paid_by_exchange_steps_only() {
        let mut cfg = ModelConfig::default();
        let base = |cfg: &ModelConfig, op, a, n| {
            estimate(cfg, ChannelKind::Tcp, op, a, Bytes(n), 4)
                .unwrap()
                .seconds
                .0
        };
        let rd = base(&cfg, Op::Allreduce, Algorithm::RecursiveDoubling, 8);
        let ring = base(&cfg, Op::Allreduce, Algorithm::Ring, 8);
        let tree = base(&cfg, Op::Bcast, Algorithm::Binomial, 8);
        cfg.params_mut(ChannelKind::Tcp).exchange_extra = Seconds(0.001);
        // 4 ranks: 2 rounds of recursive doubling, 2 × 3 ring steps; a binomial broadcast's
        // rounds are one-way.
        let d = base(&cfg, Op::Allreduce, Algorithm::RecursiveDoubling, 8) - rd;
        assert!((d - 0.002).abs() < 1e-12, "{d}");
        let d = base(&cfg, Op::Allreduce, Algorithm::Ring, 8) - ring;
        assert!((d - 0.006).abs() < 1e-12, "{d}");
        let d = base(&cfg, Op::Bcast, Algorithm::Binomial, 8) - tree;
        assert!(d.abs() < 1e-15, "{d}");
    }

    #[test]
    fn tcp_message_is_alpha_plus_n_beta() {
        let e = est(
            ChannelKind::Tcp,
            Op::Send,
            Algorithm::PointToPoint,
            4_000_000,
            2,
        );
        assert!((e.seconds.0 - (0.00034 + 0.01)).abs() < 1e-12, "{e:?}");
        assert!(e.requests.is_empty());
    }

    #[test]
    fn s3_small_message_polls_once() {
        // Write 20.2 ms; first poll at 0 is empty, the next after 20.2 + 100 ms finds it.
        let e = est(ChannelKind::S3, Op::Send, Algorithm::PointToPoint, 8, 2);
        assert!((e.seconds.0 - 0.1404).abs() < 1e-6, "{e:?}");
        assert_eq!(e.requests.puts, 1);
        assert_eq!(e.requests.gets, 2);
        assert_eq!(e.requests.empty_gets, 1);
        assert_eq!(e.requests.deletes, 1);
        let requests = 0.005 / 1000.0 + 2.0 * 0.0004 / 1000.0;
        assert!((e.request_dollars.0 - requests).abs() < 1e-15);
        let waiting = e.seconds.0 * 2.0 * 0.000_016_666_7;
        assert!((e.dollars.0 - requests - waiting).abs() < 1e-15);
    }

    #[test]
    fn dynamodb_units_and_chunks() {
        // 1 MB: chunk 0 (350,000 B incl. header), then 2 more chunks.
        let e = est(
            ChannelKind::DynamoDb,
            Op::Send,
            Algorithm::PointToPoint,
            1_000_000,
            2,
        );
        assert_eq!(e.requests.puts, 3);
        assert_eq!(e.requests.gets, 3 + e.requests.empty_gets);
        let c = Chunks::new(1_000_000, Some(Bytes(350_000)));
        assert_eq!((c.count, c.full, c.tail), (3, 2, 1_000_000 + 13 - 700_000));
        let wu = |s: u64| (s + 80).div_ceil(1024);
        let want = 2 * (2 * wu(350_000) + wu(300_013)) + e.requests.empty_gets;
        assert_eq!(e.requests.write_units, want);
        assert_eq!(e.requests.deletes, 0);
    }

    #[test]
    fn chunk_boundaries() {
        let max = Some(Bytes(100));
        assert_eq!(Chunks::new(87, max).count, 1);
        assert_eq!(Chunks::new(88, max).count, 2);
        assert_eq!(Chunks::new(187, max).count, 2);
        assert_eq!(Chunks::new(188, max).count, 3);
        assert_eq!(Chunks::new(0, None).count, 1);
    }

    #[test]
    fn s3_multipart_requests() {
        // 64 MiB fits one object, above the 16 MiB threshold: 8 parts + create + complete.
        let n = 64 * 1024 * 1024 - 13;
        let e = est(ChannelKind::S3, Op::Send, Algorithm::PointToPoint, n, 2);
        assert_eq!(e.requests.puts, 10);
    }

    #[test]
    fn tree_rounds_send_p_minus_1_messages() {
        for p in 1..=33u64 {
            let total: u64 = distances(p)
                .into_iter()
                .map(|m| tree_round(p, m).iter().map(|g| g.0).sum::<u64>())
                .sum();
            assert_eq!(total, p - 1, "p = {p}");
            // Scatter moves every block but the root's exactly once per level it descends.
            let blocks: u64 = distances(p)
                .into_iter()
                .map(|m| tree_round(p, m).iter().map(|g| g.0 * g.1).sum::<u64>())
                .sum();
            assert!(blocks >= p - 1);
        }
    }

    #[test]
    fn scan_pairs() {
        for p in 1..=20u64 {
            for j in 0..ceil_log2(p) {
                let mask = 1u64 << j;
                let brute = (0..p).filter(|r| (r ^ mask) < p).count() as u64;
                let count = with_bit(p, j)
                    + if p > mask {
                        (p - mask) - with_bit(p - mask, j)
                    } else {
                        0
                    };
                assert_eq!(count, brute, "p {p} j {j}");
            }
        }
    }

    #[test]
    fn alpha_beta_table_on_tcp() {
        // With no polling and no chunking, the steps reproduce the collectives' α-β table.
        let c = ModelConfig::default();
        let (a, b) = (c.tcp.alpha.0, c.tcp.beta.0);
        let g = c.gamma.0;
        let n = 1u64 << 20;
        let nf = n as f64;
        let p = 8u32;
        let pf = 8.0;
        let lg = 3.0;
        let close = |x: f64, y: f64| assert!((x - y).abs() < 1e-12 * y.max(1.0), "{x} vs {y}");
        let t = |op, alg| est(ChannelKind::Tcp, op, alg, n, p).seconds.0;
        close(t(Op::Bcast, Algorithm::Binomial), lg * (a + nf * b));
        close(
            t(Op::Allreduce, Algorithm::RecursiveDoubling),
            lg * (a + nf * b + nf * g),
        );
        close(
            t(Op::Allreduce, Algorithm::Ring),
            2.0 * (pf - 1.0) * (a + nf / pf * b) + (pf - 1.0) * nf / pf * g,
        );
        close(
            t(Op::Allreduce, Algorithm::Rabenseifner),
            2.0 * lg * a + 2.0 * (pf - 1.0) / pf * nf * b + (pf - 1.0) / pf * nf * g,
        );
        close(t(Op::Barrier, Algorithm::Dissemination), lg * a);
        close(
            t(Op::Gather, Algorithm::Binomial),
            lg * a + (pf - 1.0) / pf * nf * b,
        );
    }

    #[test]
    fn natives_only_where_counters_exist() {
        let c = ModelConfig::default();
        assert!(applicable(
            &c,
            ChannelKind::DynamoDb,
            Op::Bcast,
            Algorithm::NativeBcast
        ));
        assert!(applicable(
            &c,
            ChannelKind::Redis,
            Op::Barrier,
            Algorithm::CounterBarrier
        ));
        assert!(!applicable(
            &c,
            ChannelKind::S3,
            Op::Bcast,
            Algorithm::NativeBcast
        ));
        assert!(!applicable(
            &c,
            ChannelKind::Tcp,
            Op::Barrier,
            Algorithm::CounterBarrier
        ));
        assert!(!applicable(
            &c,
            ChannelKind::Tcp,
            Op::Bcast,
            Algorithm::Ring
        ));
        // Where the native form is on, it is what runs: the message-based forms do not apply
        // there (but still do for the ops that have no native form).
        for (op, message_based) in [
            (Op::Bcast, Algorithm::Binomial),
            (Op::Bcast, Algorithm::ScatterAllgather),
            (Op::Barrier, Algorithm::Dissemination),
        ] {
            assert!(!applicable(&c, ChannelKind::Redis, op, message_based));
            assert!(applicable(&c, ChannelKind::S3, op, message_based));
        }
        assert!(applicable(
            &c,
            ChannelKind::Redis,
            Op::Gather,
            Algorithm::Binomial
        ));
        let mut off = ModelConfig::default();
        off.redis.native_bcast = false;
        off.redis.native_barrier = false;
        assert!(applicable(
            &off,
            ChannelKind::Redis,
            Op::Bcast,
            Algorithm::Binomial
        ));
        assert!(applicable(
            &off,
            ChannelKind::Redis,
            Op::Barrier,
            Algorithm::Dissemination
        ));
        // 1 PUT + (N−1) GETs, N−1 counter updates, one batch delete.
        let e = est(
            ChannelKind::DynamoDb,
            Op::Bcast,
            Algorithm::NativeBcast,
            100,
            5,
        );
        assert_eq!(e.requests.puts, 1);
        assert_eq!(e.requests.gets - e.requests.empty_gets, 4);
        assert_eq!(e.requests.counters, 4);
        assert_eq!(e.requests.deletes, 1);
        let b = est(
            ChannelKind::DynamoDb,
            Op::Barrier,
            Algorithm::CounterBarrier,
            0,
            5,
        );
        assert_eq!(b.requests.counters, 9);
        assert_eq!(b.requests.puts, 1);
    }

    #[test]
    fn one_rank_costs_nothing_but_send() {
        for op in Op::ALL {
            for &a in op.algorithms() {
                if let Some(e) = estimate(
                    &ModelConfig::default(),
                    ChannelKind::S3,
                    op,
                    a,
                    Bytes(64),
                    1,
                ) {
                    if op == Op::Send {
                        assert!(e.seconds.0 > 0.0);
                    } else {
                        assert_eq!(e.seconds, Seconds::ZERO, "{op} {a}");
                        assert!(e.requests.is_empty());
                    }
                }
            }
        }
        assert!(estimate(
            &ModelConfig::default(),
            ChannelKind::S3,
            Op::Send,
            Algorithm::PointToPoint,
            Bytes(1),
            0
        )
        .is_none());
    }

    #[test]
    fn long_waits_poll_at_the_cap() {
        let c = ModelConfig::default();
        let ch = Chan {
            kind: ChannelKind::S3,
            p: &c.s3,
        };
        // Polls at 0, 0.1202, 0.3404, 0.7606, then every 1.0202 s from 1.5808.
        let (seen, empty) = ch.notice(0.0, 10.0);
        assert!((10.0..10.0 + 1.0202 + 1e-9).contains(&seen), "{seen}");
        assert_eq!(empty, 4 + ((10.0 - 1.5808f64) / 1.0202).ceil() as u64);
        // A receiver that waited long notices later relative to the step, never earlier
        // than the value exists.
        let (s2, _) = ch.notice(3.0, 0.0202);
        assert!(s2 >= 0.0202);
    }
}
