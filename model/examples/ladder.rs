//! Prints `fmi explain`'s table without the CLI: `cargo run -p fmi-model --example ladder -- RANKS OBJECTIVE CHANNELS`.

use fmi_model::explain::{explain, table, LADDER};
use fmi_model::{ChannelKind, ModelConfig, Objective, Op};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let ranks: u32 = args.get(1).map_or(Ok(8), |s| s.parse())?;
    let objective: Objective = args.get(2).map_or(Ok(Objective::Fast), |s| s.parse())?;
    let channels = match args.get(3) {
        Some(list) => list
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<ChannelKind>, _>>()?,
        None => ChannelKind::ALL.to_vec(),
    };
    let rows = explain(
        &ModelConfig::default(),
        ranks,
        objective,
        &channels,
        &Op::ALL,
        &LADDER,
    )?;
    print!("{}", table(&rows));
    Ok(())
}
