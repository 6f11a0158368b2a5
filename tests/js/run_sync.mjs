// Calls runSync of RunPod's official JS SDK (runpod-sdk) and prints its result as one "RESULT <json>" line.
// runSync POSTs /runsync?wait=, then, while the job is not final, GETs /status-sync/{id}?wait= and logs
// "<id>: <status>" after each answer.
//
// usage: node run_sync.mjs BASE_URL ENDPOINT_ID INPUT_JSON TIMEOUT_MS   (the API key comes from RUNPOD_API_KEY)
import runpodSdk from "runpod-sdk";

const [baseUrl, endpointId, input, timeoutMs] = process.argv.slice(2);
const endpoint = runpodSdk(process.env.RUNPOD_API_KEY, { baseUrl }).endpoint(endpointId);
const result = await endpoint.runSync({ input: JSON.parse(input) }, Number(timeoutMs));
console.log("RESULT " + JSON.stringify(result));
