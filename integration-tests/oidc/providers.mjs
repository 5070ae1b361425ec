// Two real OpenID providers (oidc-provider) for the integration tests: the residents' one
// (latvija.lv-like: personal codes, eIDAS identities) and the staff one (the institutions'
// directory: staff ids, institutions, centres, roles), each on its own HTTP server, plus a small
// control server that makes a provider misbehave the way real ones do: the next ID token with
// wrong claims, a rotated signing key, a slow token endpoint, a discovery document naming
// another issuer or endpoints elsewhere. The staff provider authenticates its client with
// `client_secret_post` only (discovery says so), the residents' with `client_secret_basic`.
// With OIDC_TLS_CERT and OIDC_TLS_KEY (PEM files) a third provider, a copy of the residents'
// one, serves HTTPS with that certificate (a municipality's own CA, say).
//
//   node providers.mjs [--resident-port N] [--staff-port M] [--tamper-port T]
//
// Without ports each server takes an ephemeral one. When all listen, exactly one line of JSON
// goes to stdout: {"resident":"<issuer>","staff":"<issuer>","tamper":"<control URL>"} (and
// "tls":"<issuer>" when the HTTPS provider runs); nothing else is ever written there (logs go
// to stderr), because the test harness reads that line.
// The process exits when its stdin closes (so it dies with the test process that started it),
// and on SIGTERM/SIGINT. Run by hand from a terminal it runs until Ctrl-D or Ctrl-C (with stdin
// from /dev/null it would stop at once: keep a pipe open, e.g. `sleep infinity | node …`).
//
// Set DEBUG=oidc-provider:* for oidc-provider's own trace on stderr.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import { parseArgs } from 'node:util';

import { Provider, errors } from 'oidc-provider';

// oidc-provider prints its configuration NOTICEs with console.info, i.e. to stdout, which
// belongs to the JSON line alone: send everything console prints to stderr.
console.log = console.error;
console.info = console.error;

const CLIENT_ID = 'onestop-identity';
const CLIENT_SECRET = process.env.OIDC_CLIENT_SECRET || 'dev-secret-0123456789abcdef0123';
const REDIRECT_URIS = [
  'https://portal.test/callback',
  'https://desk.test/callback',
  'https://other.test/callback',
];
const ACR_VALUES = [
  'urn:onestop:loa:low',
  'urn:onestop:loa:substantial',
  'urn:onestop:loa:high',
];

// The people who can log in at each provider, by account id (which is also the `sub`).
// Personal codes are old-format (DDMMYY-CNNNN) Latvian codes with a valid check digit:
// d11 = (1101 - (1*d1 + 6*d2 + 3*d3 + 7*d4 + 9*d5 + 10*d6 + 5*d7 + 8*d8 + 4*d9 + 2*d10)) mod 11.
//   121282-11236: 1+12+3+14+72+20+5+8+8+6 = 149, (1101-149) mod 11 = 952 mod 11 = 6
//   050390-12344: 0+30+0+21+81+0+5+16+12+8 = 173, (1101-173) mod 11 = 928 mod 11 = 4
const ACCOUNTS = {
  resident: {
    'lv-resident': {
      personal_code: '121282-11236',
      given_name: 'Jānis',
      family_name: 'Bērziņš',
      country: 'LV',
    },
    'lv-resident-2': {
      personal_code: '050390-12344',
      given_name: 'Līga',
      family_name: 'Kalniņa',
      country: 'LV',
    },
    // A visitor identified through eIDAS: no Latvian personal code.
    'ee-visitor': {
      eidas_id: 'EE/LV/38001085718',
      given_name: 'Mari',
      family_name: 'Tamm',
      country: 'EE',
    },
  },
  staff: {
    'clerk-gulbene': {
      staff_id: 'j.ozola',
      institution: 'MUN/GULBENE',
      centre: 'gulbene-kac',
      roles: ['clerk'],
    },
    'clerk-rugaji': {
      staff_id: 'a.liepa',
      institution: 'MUN/RUGAJI',
      centre: 'rugaji-kac',
      roles: ['clerk'],
    },
    // A specialist of a state institution works at no centre: the claim is absent.
    'specialist-vsaa': {
      staff_id: 'p.kalnins',
      institution: 'GOV/VSAA',
      roles: ['specialist'],
    },
  },
};

// What each provider offers beyond `openid`: the scope and the claims it carries.
const SCOPES = {
  resident: { identity: ['personal_code', 'eidas_id', 'country', 'given_name', 'family_name'] },
  staff: { staff: ['staff_id', 'institution', 'centre', 'roles'] },
};

// What the control server set for each provider: one-shot claim overrides of the next ID token,
// a signing key that replaced the original one (rotation), a one-shot delay of the next token
// response, and overrides of the discovery document (until cleared).
const control = {
  resident: { tamper: null, rotated: null, delayMs: 0, discovery: null },
  staff: { tamper: null, rotated: null, delayMs: 0, discovery: null },
  tls: { tamper: null, rotated: null, delayMs: 0, discovery: null },
};
// How each provider's client authenticates at its token endpoint.
const CLIENT_AUTH = {
  resident: 'client_secret_basic',
  staff: 'client_secret_post',
  tls: 'client_secret_basic',
};

const { values: args } = parseArgs({
  options: {
    'resident-port': { type: 'string', default: '0' },
    'staff-port': { type: 'string', default: '0' },
    'tamper-port': { type: 'string', default: '0' },
  },
});

function log(...parts) {
  process.stderr.write(`providers.mjs: ${parts.join(' ')}\n`);
}

function esc(value) {
  return String(value ?? '')
    .replaceAll('&', '&amp;')
    .replaceAll('<', '&lt;')
    .replaceAll('>', '&gt;')
    .replaceAll('"', '&quot;')
    .replaceAll("'", '&#39;');
}

// A fresh RS256 and ES256 signing key (or only the first `count`), with RFC 7638 thumbprints as
// key ids.
function signingKeys(count = 2) {
  const keys = [];
  for (const [alg, type, options] of [
    ['RS256', 'rsa', { modulusLength: 2048 }],
    ['ES256', 'ec', { namedCurve: 'P-256' }],
  ].slice(0, count)) {
    const { privateKey } = crypto.generateKeyPairSync(type, options);
    const jwk = privateKey.export({ format: 'jwk' });
    const members = jwk.kty === 'RSA' ? ['e', 'kty', 'n'] : ['crv', 'kty', 'x', 'y'];
    const canonical = JSON.stringify(Object.fromEntries(members.map((m) => [m, jwk[m]])));
    const kid = crypto.hash('sha256', canonical, 'base64url');
    keys.push({ ...jwk, kid, alg, use: 'sig' });
  }
  return keys;
}

// The public half of a JWK.
function publicJwk(jwk) {
  const members = jwk.kty === 'RSA' ? ['e', 'kty', 'n'] : ['crv', 'kty', 'x', 'y'];
  return { ...Object.fromEntries(members.map((m) => [m, jwk[m]])), kid: jwk.kid, alg: jwk.alg, use: 'sig' };
}

// Signs `header.payload` again with the provider's own key of that kid, so that only the
// claims are wrong, never the signature.
function resign(jwks, header, payload) {
  const jwk = jwks.find((key) => key.kid === header.kid);
  if (!jwk) throw new Error(`no signing key with kid ${header.kid}`);
  const key = crypto.createPrivateKey({ key: jwk, format: 'jwk' });
  const input = `${Buffer.from(JSON.stringify(header)).toString('base64url')}.${Buffer.from(
    JSON.stringify(payload),
  ).toString('base64url')}`;
  let signature;
  switch (header.alg) {
    case 'RS256':
      signature = crypto.sign('sha256', Buffer.from(input), key);
      break;
    case 'ES256':
      signature = crypto.sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' });
      break;
    default:
      throw new Error(`cannot re-sign alg ${header.alg}`);
  }
  return `${input}.${signature.toString('base64url')}`;
}

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${esc(title)}</title></head>
<body>
<h1>${esc(title)}</h1>
${body}
</body>
</html>
`;
}

function loginPage(name, uid, params, error) {
  // Preselect the first acr the client asked for, as a real login page would offer it; the
  // person may still pick another, and the provider enforces nothing (the service checks).
  const wanted = String(params.acr_values ?? '').split(' ')[0];
  const selected = ACR_VALUES.includes(wanted) ? wanted : ACR_VALUES[0];
  const options = ACR_VALUES.map(
    (acr) => `<option value="${esc(acr)}"${acr === selected ? ' selected' : ''}>${esc(acr)}</option>`,
  ).join('');
  return page(
    `Sign in at the ${name} provider`,
    `${error ? `<p class="error" role="alert">${esc(error)}</p>\n` : ''}<p>Client: ${esc(params.client_id)}</p>
<form method="post" action="/interaction/${esc(uid)}/login">
<label>Account <input name="login" required></label>
<label>Level of assurance <select name="acr">${options}</select></label>
<button type="submit">Sign in</button>
</form>`,
  );
}

function consentPage(name, uid, params, details) {
  const scopes = details.missingOIDCScope ?? [];
  const claims = details.missingOIDCClaims ?? [];
  return page(
    `Allow ${params.client_id} at the ${name} provider`,
    `<p>Scopes: ${esc(scopes.join(' '))}</p>
<p>Claims: ${esc(claims.join(' '))}</p>
<form method="post" action="/interaction/${esc(uid)}/confirm">
<button type="submit">Allow</button>
</form>`,
  );
}

// The body of a form POST (application/x-www-form-urlencoded), bounded.
async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new errors.InvalidRequest('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function makeProvider(name, issuer, jwks) {
  const accounts = ACCOUNTS[name === 'tls' ? 'resident' : name];
  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: CLIENT_ID,
        client_secret: CLIENT_SECRET,
        token_endpoint_auth_method: CLIENT_AUTH[name],
        grant_types: ['authorization_code'],
        response_types: ['code'],
        redirect_uris: REDIRECT_URIS,
        id_token_signed_response_alg: 'RS256',
      },
    ],
    jwks: { keys: jwks },
    // Random per run: the cookies only live as long as this process.
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    responseTypes: ['code'],
    pkce: { required: () => true },
    // Discovery lists exactly the method the client is registered with.
    clientAuthMethods: [CLIENT_AUTH[name]],
    scopes: ['openid'],
    claims: { openid: ['sub'], ...SCOPES[name === 'tls' ? 'resident' : name] },
    // The scope's claims go into the ID token itself, not only to the userinfo endpoint.
    conformIdTokenClaims: false,
    acrValues: ACR_VALUES,
    // Plain numbers (seconds): oidc-provider prints a notice for each default ttl function used.
    ttl: {
      AccessToken: 3600,
      AuthorizationCode: 60,
      Grant: 3600,
      IdToken: 3600,
      Interaction: 3600,
      Session: 3600,
    },
    features: { devInteractions: { enabled: false } },
    interactions: { url: async (ctx, interaction) => `/interaction/${interaction.uid}` },
    async findAccount(ctx, sub) {
      const profile = accounts[sub];
      if (!profile) return undefined;
      return {
        accountId: sub,
        async claims() {
          return { sub, ...structuredClone(profile) };
        },
      };
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page(
        `Error at the ${name} provider`,
        Object.entries(out)
          .map(([key, value]) => `<p><strong>${esc(key)}</strong>: ${esc(value)}</p>`)
          .join('\n'),
      );
    },
  });

  provider.on('server_error', (ctx, error) => log(`${name}: server error:`, error?.stack ?? error));

  // The interaction pages: plain HTML forms, no scripts, so that a test drives them with plain
  // HTTP requests the way a browser would.
  provider.use(async (ctx, next) => {
    const match = /^\/interaction\/([^/]+)(?:\/(login|confirm))?$/.exec(ctx.path);
    if (!match) return next();
    const [, uid, action] = match;
    ctx.set('cache-control', 'no-store');
    try {
      const details = await provider.interactionDetails(ctx.req, ctx.res);
      if (details.uid !== uid) throw new errors.SessionNotFound('interaction mismatch');
      const { prompt, params } = details;
      if (!action && ctx.method === 'GET') {
        ctx.type = 'html';
        ctx.body =
          prompt.name === 'login'
            ? loginPage(name, uid, params)
            : consentPage(name, uid, params, prompt.details);
        return undefined;
      }
      if (action === 'login' && ctx.method === 'POST' && prompt.name === 'login') {
        const form = await readForm(ctx.req);
        const login = form.get('login') ?? '';
        const acr = form.get('acr') ?? '';
        let error;
        if (!Object.hasOwn(accounts, login)) error = `Unknown account: ${login}`;
        else if (!ACR_VALUES.includes(acr)) error = `Unknown level of assurance: ${acr}`;
        if (error) {
          ctx.type = 'html';
          ctx.body = loginPage(name, uid, params, error);
          return undefined;
        }
        const returnTo = await provider.interactionResult(
          ctx.req,
          ctx.res,
          { login: { accountId: login, acr, amr: ['pwd'] } },
          { mergeWithLastSubmission: false },
        );
        ctx.status = 303;
        ctx.redirect(returnTo);
        return undefined;
      }
      if (action === 'confirm' && ctx.method === 'POST' && prompt.name === 'consent') {
        await readForm(ctx.req);
        // Grant everything asked for: the tests are about the relying party, not consent.
        const grant = details.grantId
          ? await provider.Grant.find(details.grantId)
          : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
        if (prompt.details.missingOIDCScope) {
          grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
        }
        if (prompt.details.missingOIDCClaims) {
          grant.addOIDCClaims(prompt.details.missingOIDCClaims);
        }
        const grantId = await grant.save();
        const consent = details.grantId ? {} : { grantId };
        const returnTo = await provider.interactionResult(
          ctx.req,
          ctx.res,
          { consent },
          { mergeWithLastSubmission: true },
        );
        ctx.status = 303;
        ctx.redirect(returnTo);
        return undefined;
      }
      throw new errors.InvalidRequest(`${ctx.method} ${ctx.path} does not fit prompt ${prompt.name}`);
    } catch (error) {
      if (!(error instanceof errors.OIDCProviderError)) throw error;
      ctx.status = error.status;
      ctx.type = 'html';
      ctx.body = page(`Error at the ${name} provider`, `<p>${esc(error.message)}: ${esc(error.error_description)}</p>`);
      return undefined;
    }
  });

  // Negative tests: the next token response carrying an ID token gets the claims set through
  // the control server, re-signed with this provider's own key (same kid, same alg); after a
  // rotation every ID token is signed with the new key (its kid) instead.
  const tokenPath = provider.pathFor('token');
  const jwksPath = provider.pathFor('jwks');
  const discoveryPath = '/.well-known/openid-configuration';
  const own = control[name];
  provider.use(async (ctx, next) => {
    if (ctx.path === tokenPath && own.delayMs > 0) {
      // A slow provider: the answer comes late, and not at all to a client that gave up.
      const delay = own.delayMs;
      own.delayMs = 0;
      await new Promise((resolve) => setTimeout(resolve, delay));
      if (ctx.req.socket.destroyed) {
        log(`${name}: the client left during a delayed token request`);
        return;
      }
    }
    await next();
    if (ctx.path === discoveryPath && own.discovery && ctx.body && typeof ctx.body === 'object') {
      ctx.body = { ...ctx.body, ...own.discovery };
      return;
    }
    if (ctx.path === jwksPath && own.rotated && ctx.body && typeof ctx.body === 'object') {
      ctx.body = { keys: [...(ctx.body.keys ?? []), publicJwk(own.rotated)] };
      return;
    }
    const overrides = own.tamper;
    if (ctx.path !== tokenPath || typeof ctx.body?.id_token !== 'string') return;
    if (!overrides && !own.rotated) return;
    own.tamper = null;
    const [header, payload] = ctx.body.id_token
      .split('.')
      .slice(0, 2)
      .map((part) => JSON.parse(Buffer.from(part, 'base64url').toString('utf8')));
    for (const [claim, value] of Object.entries(overrides ?? {})) {
      // null removes the claim, e.g. to see a missing nonce refused.
      if (value === null) delete payload[claim];
      else payload[claim] = value;
    }
    const keys = own.rotated ? [own.rotated] : jwks;
    if (own.rotated) {
      header.kid = own.rotated.kid;
      header.alg = own.rotated.alg;
    }
    ctx.body = { ...ctx.body, id_token: resign(keys, header, payload) };
    if (overrides) log(`${name}: tampered ID token: ${JSON.stringify(overrides)}`);
  });

  return provider;
}

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(port), '127.0.0.1', () => {
      server.off('error', reject);
      resolve(server.address().port);
    });
  });
}

// The issuer is only known once the port is, so each provider is made after its server listens
// and the server hands requests to it from then on.
async function start(name, port, tls) {
  let handler = (req, res) => {
    res.statusCode = 503;
    res.end();
  };
  const server = tls
    ? https.createServer(tls, (req, res) => handler(req, res))
    : http.createServer((req, res) => handler(req, res));
  const bound = await listen(server, port);
  const issuer = `${tls ? 'https' : 'http'}://127.0.0.1:${bound}`;
  const provider = makeProvider(name, issuer, signingKeys());
  handler = provider.callback();
  return { server, issuer };
}

// The control server: POST {"provider":"resident"|"staff"|"tls", ...} with one of
//   "claims":{...}          the next ID token's claims overridden (null removes one)
//   "rotate":true           a new signing key, published and signing every ID token from now on
//   "delay_token_ms":N      the next token response N ms late (dropped if the client left)
//   "discovery":{...}|null  members of the discovery document overridden, or no longer
// → 204.
async function startTamper(port) {
  const server = http.createServer(async (req, res) => {
    const reply = (status, text) => {
      res.statusCode = status;
      res.setHeader('content-type', 'text/plain; charset=utf-8');
      res.end(text);
    };
    if (req.method !== 'POST') return reply(405, 'POST {"provider":…,"claims":{…}}\n');
    try {
      const chunks = [];
      for await (const chunk of req) chunks.push(chunk);
      const order = JSON.parse(Buffer.concat(chunks).toString('utf8'));
      const { provider, claims } = order;
      if (!Object.hasOwn(control, provider)) {
        return reply(400, `unknown provider ${JSON.stringify(provider)}\n`);
      }
      const own = control[provider];
      if (order.rotate === true) {
        own.rotated = signingKeys(1)[0];
        log(`${provider}: signing key rotated to ${own.rotated.kid}`);
      } else if (Number.isInteger(order.delay_token_ms)) {
        own.delayMs = order.delay_token_ms;
      } else if (Object.hasOwn(order, 'discovery')) {
        own.discovery = order.discovery;
      } else if (claims && typeof claims === 'object' && !Array.isArray(claims)) {
        own.tamper = claims;
      } else {
        return reply(400, 'claims must be a JSON object\n');
      }
      res.statusCode = 204;
      return res.end();
    } catch (error) {
      return reply(400, `${error.message}\n`);
    }
  });
  const bound = await listen(server, port);
  return { server, url: `http://127.0.0.1:${bound}/` };
}

const resident = await start('resident', args['resident-port']);
const staff = await start('staff', args['staff-port']);
const tamper = await startTamper(args['tamper-port']);
const tlsFiles = [process.env.OIDC_TLS_CERT, process.env.OIDC_TLS_KEY];
const secure = tlsFiles.every(Boolean)
  ? await start('tls', 0, { cert: fs.readFileSync(tlsFiles[0]), key: fs.readFileSync(tlsFiles[1]) })
  : null;

function stop() {
  for (const { server } of [resident, staff, tamper, ...(secure ? [secure] : [])]) {
    server.closeAllConnections?.();
  }
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
// Stdin closing means whoever started us is gone.
process.stdin.on('end', stop);
process.stdin.on('error', stop);
process.stdin.resume();

const announced = { resident: resident.issuer, staff: staff.issuer, tamper: tamper.url };
if (secure) announced.tls = secure.issuer;
log(`providers: ${JSON.stringify(announced)}`);
process.stdout.write(`${JSON.stringify(announced)}\n`);
