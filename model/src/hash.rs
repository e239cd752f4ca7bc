//! A hash of everything a choice depends on, identical in every process and on every platform.

use crate::choose::canonical;
use crate::params::{ChannelKind, ChannelParams, ModelConfig, Objective};

/// FNV-1a, 64 bits: no keys, no random state.
struct Fnv(u64);

impl Fnv {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(Fnv::PRIME);
        }
    }

    /// A named field: the name (length-prefixed) then the value, so that no two field lists
    /// encode alike.
    fn field(&mut self, name: &str, value: &[u8]) {
        self.bytes(&(name.len() as u64).to_le_bytes());
        self.bytes(name.as_bytes());
        self.bytes(&(value.len() as u64).to_le_bytes());
        self.bytes(value);
    }

    fn f64(&mut self, name: &str, v: f64) {
        // −0.0 and 0.0 compare equal and must hash alike.
        let v = if v == 0.0 { 0.0 } else { v };
        self.field(name, &v.to_bits().to_le_bytes());
    }

    fn u64(&mut self, name: &str, v: u64) {
        self.field(name, &v.to_le_bytes());
    }

    fn bool(&mut self, name: &str, v: bool) {
        self.field(name, &[u8::from(v)]);
    }
}

/// Version of the encoding; bump it when the model's formulas change, so that ranks built from
/// different versions of this crate disagree at bootstrap instead of choosing differently.
const ENCODING: &str = "fmi-model/1";

/// A 64-bit hash of the model configuration, the set of channels (order and duplicates do not
/// matter) and the objective: equal hashes mean [`crate::choose`] answers alike. Only the
/// parameters of the listed channels count. FNV-1a over a fixed little-endian encoding of every
/// value (f64 by its bits), so it is the same in every process, build and platform.
pub fn config_hash(config: &ModelConfig, channels: &[ChannelKind], objective: Objective) -> u64 {
    let mut h = Fnv(Fnv::OFFSET);
    h.field("encoding", ENCODING.as_bytes());
    match objective {
        Objective::Fast => h.field("objective", b"fast"),
        Objective::Cheap => h.field("objective", b"cheap"),
        Objective::Weighted { usd_per_second } => h.f64("objective", usd_per_second),
    }
    h.f64("function_memory_gb", config.function_memory_gb);
    h.f64(
        "function_usd_per_gb_second",
        config.function_usd_per_gb_second.0,
    );
    h.f64("gamma", config.gamma.0);
    for kind in canonical(channels) {
        h.field("channel", kind.name().as_bytes());
        params(&mut h, config.params(kind));
    }
    h.0
}

fn params(h: &mut Fnv, p: &ChannelParams) {
    h.f64("alpha", p.alpha.0);
    h.f64("beta", p.beta.0);
    h.f64("aggregate_beta", p.aggregate_beta.0);
    h.f64("request", p.request.0);
    // Only when set, so that the hashes of models without it stay what they were.
    if p.exchange_extra.0 != 0.0 {
        h.f64("exchange_extra", p.exchange_extra.0);
    }
    h.bool("push", p.push);
    h.f64("poll_initial", p.poll_initial.0);
    h.f64("poll_max", p.poll_max.0);
    h.u64("max_chunk", p.max_chunk.map_or(0, |b| b.0));
    h.u64("put_concurrency", u64::from(p.put_concurrency));
    h.u64(
        "multipart_threshold",
        p.multipart_threshold.map_or(0, |b| b.0),
    );
    h.u64("part_size", p.part_size.0);
    h.u64("item_overhead", p.item_overhead.0);
    h.bool("counters", p.counters);
    h.bool("native_bcast", p.native_bcast);
    h.bool("native_barrier", p.native_barrier);
    let pr = &p.prices;
    h.f64("put_per_1k", pr.put_per_1k.0);
    h.f64("get_per_1k", pr.get_per_1k.0);
    h.f64("delete_per_1k", pr.delete_per_1k.0);
    h.f64("list_per_1k", pr.list_per_1k.0);
    h.f64("counter_per_1k", pr.counter_per_1k.0);
    h.f64("write_unit_per_1m", pr.write_unit_per_1m.0);
    h.u64("write_unit", pr.write_unit.0);
    h.f64("read_unit_per_1m", pr.read_unit_per_1m.0);
    h.u64("read_unit", pr.read_unit.0);
    h.f64("instance_per_hour", pr.instance_per_hour.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Seconds;

    #[test]
    fn fnv_reference_vector() {
        let mut h = Fnv(Fnv::OFFSET);
        h.bytes(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn order_and_duplicates_do_not_matter_values_do() {
        use ChannelKind::*;
        let c = ModelConfig::default();
        let a = config_hash(&c, &[S3, DynamoDb], Objective::Cheap);
        assert_eq!(a, config_hash(&c, &[DynamoDb, S3, S3], Objective::Cheap));
        assert_ne!(a, config_hash(&c, &[DynamoDb], Objective::Cheap));
        assert_ne!(a, config_hash(&c, &[S3, DynamoDb], Objective::Fast));
        assert_ne!(
            a,
            config_hash(
                &c,
                &[S3, DynamoDb],
                Objective::Weighted {
                    usd_per_second: 0.0
                }
            )
        );
        let mut d = c.clone();
        d.s3.poll_initial = Seconds(0.05);
        assert_ne!(a, config_hash(&d, &[S3, DynamoDb], Objective::Cheap));
        // A channel that is not listed does not count.
        let mut r = c.clone();
        r.redis.alpha = Seconds(1.0);
        assert_eq!(a, config_hash(&r, &[S3, DynamoDb], Objective::Cheap));
    }
}
