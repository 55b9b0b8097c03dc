// Verifies captured webhook requests with the `standardwebhooks` npm package (an independent
// implementation of the Standard Webhooks spec), for tests/webhooks.rs.
//
// Input (argv[2]): a JSON file {secret, requests: [{headers: {name: value}, body: string}]}.
// Output (stdout): a JSON array, per request, of "ok" or the verifier's error message.
import { readFileSync } from "node:fs";
import { Webhook } from "standardwebhooks";

const input = JSON.parse(readFileSync(process.argv[2], "utf8"));
const wh = new Webhook(input.secret);
const results = input.requests.map(({ headers, body }) => {
  try {
    wh.verify(body, headers);
    return "ok";
  } catch (e) {
    return String(e && e.message ? e.message : e);
  }
});
process.stdout.write(JSON.stringify(results));
