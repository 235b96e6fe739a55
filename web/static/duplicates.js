// clipsearch near-duplicates page: plain JavaScript, no build step, no external requests.
// GET api/duplicates (relative URLs, so it works behind a path prefix); thumbnails by image id. With an API key
// (asked for on a 401, shared with the search page through sessionStorage) images are fetched as blobs.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $('dup-form'), collection: $('collection'), threshold: $('threshold'),
    status: $('status'), error: $('error'), groups: $('groups'), footer: $('footer'),
    keyDialog: $('key-dialog'), keyInput: $('api-key'), keyMessage: $('key-message'), keyCancel: $('key-cancel'),
  };
  const KEY_STORAGE = 'clipsearch.apiKey';
  const state = { apiKey: sessionStorage.getItem(KEY_STORAGE) || '', seq: 0, objectUrls: [], keyPrompt: null };

  // ---- API (as on the search page) ---------------------------------------------------------------
  const apiKey = window.clipsearchApiKey(els, state, KEY_STORAGE);  // api-key.js: the key, its prompt, fetch
  const api = (path) => apiKey.request(path);

  async function showImage(img, url) {
    if (!state.apiKey) { img.src = url; return; }
    try {
      const objectUrl = URL.createObjectURL(await (await api(url)).blob());
      state.objectUrls.push(objectUrl);
      img.src = objectUrl;
    } catch (err) {
      img.alt = `${img.alt} (could not load: ${err.message})`;
    }
  }

  els.keyCancel.addEventListener('click', () => els.keyDialog.close('cancel'));

  // ---- the page --------------------------------------------------------------------------------
  function fileName(path) { return path.split(/[\\/]/).pop(); }
  function plural(n, word) { return `${n.toLocaleString()} ${word}${n === 1 ? '' : 's'}`; }
  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }
  function showError(message) { els.error.textContent = message; els.error.hidden = false; }
  function clearError() { els.error.hidden = true; els.error.textContent = ''; }

  function params() {
    const query = new URLSearchParams();
    if (els.collection.value) query.set('collection', els.collection.value);
    const threshold = els.threshold.value.trim();
    if (threshold) query.set('threshold', threshold);
    return query;
  }

  function saveState(query) {
    const url = window.location.pathname + (query.toString() ? `?${query}` : '');
    if (url !== window.location.pathname + window.location.search) window.history.replaceState(null, '', url);
  }

  function renderGroup(group, number) {
    const section = document.createElement('section');
    section.className = 'group';
    section.setAttribute('aria-labelledby', `group-${number}`);
    const title = document.createElement('h2');
    title.id = `group-${number}`;
    title.textContent = `Group ${number} · ${plural(group.count, 'image')}`;
    const list = document.createElement('ul');
    list.className = 'grid';
    group.images.forEach((image) => {
      const item = document.createElement('li');
      item.className = `result dup${image.keep ? ' keep' : ''}`;
      item.dataset.id = String(image.id);
      const name = fileName(image.path);
      const img = document.createElement('img');
      img.alt = name;
      img.loading = 'lazy';
      img.width = 256;
      img.height = 256;
      const meta = document.createElement('div');
      meta.className = 'meta';
      const nameEl = document.createElement('span');
      nameEl.className = 'name';
      nameEl.textContent = name;
      nameEl.title = image.path;
      const dims = document.createElement('span');
      dims.className = 'dims';
      dims.textContent = image.width && image.height ? `${image.width} × ${image.height}` : '? × ?';
      const size = document.createElement('span');
      size.className = 'bytes';
      size.textContent = formatBytes(image.bytes);
      const similarity = document.createElement('span');
      similarity.className = 'similarity';
      similarity.textContent = image.keep ? 'keeper' : `similarity ${image.similarity.toFixed(3)}`;
      meta.append(nameEl, dims, size, similarity);
      const actions = document.createElement('div');
      actions.className = 'meta';
      if (image.keep) {
        const badge = document.createElement('span');
        badge.className = 'badge';
        badge.textContent = 'Keep';
        badge.title = 'Suggested copy to keep: the most pixels, then the largest file';
        actions.append(badge);
      }
      const open = document.createElement('a');
      open.className = 'open';
      open.href = image.image_url;
      open.target = '_blank';
      open.rel = 'noopener noreferrer';
      open.textContent = 'Open';
      open.setAttribute('aria-label', `Open ${name}`);
      actions.append(open);
      item.append(img, meta, actions);
      list.append(item);
      showImage(img, image.thumbnail_url);
    });
    section.append(title, list);
    return section;
  }

  async function find() {
    const seq = ++state.seq;
    const query = params();
    saveState(query);
    clearError();
    els.status.textContent = 'Looking for near-duplicates…';
    els.groups.setAttribute('aria-busy', 'true');
    try {
      const answer = await (await api(`api/duplicates?${query}`)).json();
      if (seq !== state.seq) return;
      state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
      state.objectUrls = [];
      els.groups.replaceChildren(...answer.groups.map((g, i) => renderGroup(g, i + 1)));
      const how = answer.threshold_source === 'model' ? 'the model’s own threshold' : 'your threshold';
      const at = `${how} ${answer.threshold}`;
      if (!els.threshold.value) els.threshold.placeholder = `${answer.threshold} (model's own)`;
      els.status.textContent = answer.groups.length === 0
        ? `No near-duplicates among ${plural(answer.images, 'image')} at ${at}.`
        : `${plural(answer.groups.length, 'group')}, ${answer.redundant.toLocaleString()} redundant `
          + `${answer.redundant === 1 ? 'copy' : 'copies'} among ${plural(answer.images, 'image')} at ${at}.`;
    } catch (err) {
      if (seq !== state.seq) return;
      els.groups.replaceChildren();
      els.status.textContent = 'Finding near-duplicates failed.';
      showError(err.message);
    } finally {
      if (seq === state.seq) els.groups.removeAttribute('aria-busy');
    }
  }

  async function loadCollections(wanted) {
    try {
      const stats = await (await api(`api/stats${wanted ? `?collection=${encodeURIComponent(wanted)}` : ''}`)).json();
      els.collection.replaceChildren(...stats.collections.map((name) => {
        const option = document.createElement('option');
        option.value = name;
        option.textContent = name;
        return option;
      }));
      els.collection.value = stats.collection;
      els.footer.textContent = `${stats.collection}: ${plural(stats.images, 'image')}` +
        (stats.model ? ` · model ${stats.model.name}` : '') + ` · clipsearch ${stats.version}`;
    } catch (err) {
      showError(err.message);
    }
  }

  // With a key, "Open" fetches the file with it and shows it as a blob: URL in the new tab (a plain link would 401).
  els.groups.addEventListener('click', async (event) => {
    const link = event.target.closest('a.open');
    if (!link || !state.apiKey) return;
    event.preventDefault();
    const opened = window.open('', '_blank');
    try {
      const url = URL.createObjectURL(await (await api(link.getAttribute('href'))).blob());
      if (opened) opened.location.href = url; else window.location.assign(url);
    } catch (err) {
      if (opened) opened.close();
      showError(err.message);
    }
  });

  els.form.addEventListener('submit', (event) => {
    event.preventDefault();
    find();
  });
  els.collection.addEventListener('change', () => { els.threshold.placeholder = "model's own"; find(); });

  (async () => {
    const initial = new URLSearchParams(window.location.search);
    if (initial.get('threshold')) els.threshold.value = initial.get('threshold');
    await loadCollections(initial.get('collection'));
    if (!els.error.hidden) return;
    find();
  })();
})();
