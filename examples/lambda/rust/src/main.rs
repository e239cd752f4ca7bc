//! `fmi-lambda-handler [EVENT_JSON]`: runs the handler once, as one Lambda invocation would,
//! with the event from the argument (or stdin), and prints the response as JSON.

use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let text = match std::env::args().nth(1) {
        Some(arg) => arg,
        None => {
            let mut s = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                eprintln!("fmi-lambda-handler: reading the event from stdin: {e}");
                return ExitCode::from(2);
            }
            s
        }
    };
    let event: fmi_lambda_example::Event = match serde_json::from_str(&text) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("fmi-lambda-handler: invalid event: {e}");
            return ExitCode::from(2);
        }
    };
    match fmi_lambda_example::handle(&event) {
        Ok(response) => match serde_json::to_string(&response) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fmi-lambda-handler: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            // The same JSON shape a Lambda error response has.
            let error =
                serde_json::json!({ "errorType": "fmi::Error", "errorMessage": e.to_string() });
            println!("{error}");
            ExitCode::FAILURE
        }
    }
}
