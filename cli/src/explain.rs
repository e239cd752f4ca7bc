//! `fmi explain`: what the channel model chooses for every operation and size, and why.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use fmi_model::explain::{csv, explain, table, LADDER};
use fmi_model::{config_hash, ChannelKind, JobConfig, ModelConfig, Objective, Op};

/// Arguments of `fmi explain`.
#[derive(Args, Debug)]
pub(crate) struct ExplainArgs {
    /// The job's TOML configuration: its [model] section, the channels its [channels.*]
    /// sections set up and the [storage] settings that shape them.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Number of ranks.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    ranks: u32,
    /// What to minimise: fast, cheap, or a weight in dollars per second of latency (cost =
    /// dollars + WEIGHT × seconds). Default: the config's [model] objective, else fast.
    #[arg(long, value_name = "fast|cheap|WEIGHT")]
    objective: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Channels to choose from (comma-separated: tcp,redis,s3,dynamodb). Default: those the
    /// config sets up, plus tcp when FMI_RENDEZVOUS is set or the config says channel = "tcp";
    /// without a config, all four.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    channels: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Aligned columns for people.
    Table,
    /// op,bytes,channel,algorithm,seconds,dollars,runner_up
    Csv,
}

fn fail(detail: impl std::fmt::Display) -> ExitCode {
    eprintln!("fmi explain: {detail}");
    ExitCode::from(2)
}

pub(crate) fn run(args: ExplainArgs) -> ExitCode {
    let job = match &args.config {
        Some(path) => match JobConfig::from_file(path) {
            Ok(j) => Some(j),
            Err(e) => return fail(e),
        },
        None => None,
    };
    let model = job
        .as_ref()
        .map_or_else(ModelConfig::default, |j| j.model.clone());
    let objective = match &args.objective {
        Some(s) => match s.parse::<Objective>() {
            Ok(o) => o,
            Err(e) => return fail(e),
        },
        None => model.objective,
    };
    let channels: Vec<ChannelKind> = match (&args.channels, &job) {
        (Some(list), _) => {
            let parsed: Result<Vec<ChannelKind>, _> =
                list.iter().map(|s| s.trim().parse()).collect();
            match parsed {
                Ok(v) => v,
                Err(e) => return fail(e),
            }
        }
        (None, Some(j)) => j.channels(std::env::var_os("FMI_RENDEZVOUS").is_some()),
        (None, None) => ChannelKind::ALL.to_vec(),
    };
    if channels.is_empty() {
        return fail(
            "no channel to choose from: the config sets up no [channels.*] and no rendezvous is \
             used (FMI_RENDEZVOUS); pass --channels",
        );
    }
    let rows = match explain(&model, args.ranks, objective, &channels, &Op::ALL, &LADDER) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    match args.format {
        Format::Csv => print!("{}", csv(&rows)),
        Format::Table => {
            let names: Vec<&str> = fmi_model::canonical(&channels)
                .iter()
                .map(|c| c.name())
                .collect();
            println!(
                "{} ranks, objective {objective}, channels {}, model hash {:016x}",
                args.ranks,
                names.join(","),
                config_hash(&model, &channels, objective)
            );
            println!(
                "time and dollars are the model's predictions for the whole operation (all \
                 ranks); see docs/model.md"
            );
            println!();
            print!("{}", table(&rows));
        }
    }
    ExitCode::SUCCESS
}
