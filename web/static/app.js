// clipsearch page: plain JavaScript, no build step, no external requests.
// It talks to the REST API with relative URLs (so it works behind a path prefix) and, when the server
// wants an API key, asks for it once and sends it as X-API-Key (images are then fetched as blobs).
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $('search-form'), query: $('query'), k: $('k'),
    rerankControls: $('rerank-controls'), rerank: $('rerank'), minMatch: $('min-match'),
    filters: $('filters'), filterIn: $('filter-in'), filterAfter: $('filter-after'), filterBefore: $('filter-before'),
    filterOrientation: $('filter-orientation'), filterMinSize: $('filter-min-size'), clearFilters: $('clear-filters'),
    dropZone: $('drop-zone'), fileInput: $('file-input'),
    example: $('example'), exampleImage: $('example-image'), classifyForm: $('classify-form'),
    labels: $('labels'), labelResults: $('label-results'), clearExample: $('clear-example'),
    status: $('status'), error: $('error'), results: $('results'),
    viewer: $('viewer'), viewerTitle: $('viewer-title'), viewerImage: $('viewer-image'),
    viewerMeta: $('viewer-meta'), moreLikeThis: $('more-like-this'), openFull: $('open-full'),
    closeViewer: $('close-viewer'),
    keyDialog: $('key-dialog'), keyForm: $('key-form'), keyInput: $('api-key'), keyMessage: $('key-message'),
    keyCancel: $('key-cancel'), footer: $('footer'), showMore: $('show-more'), includeSelf: $('include-self'),
  };

  const KEY_STORAGE = 'clipsearch.apiKey';
  const state = {
    apiKey: sessionStorage.getItem(KEY_STORAGE) || '',
    requestSeq: 0,          // answers to older requests than the newest are dropped
    results: [],
    exampleFile: null,
    exampleUrl: null,
    objectUrls: [],
    openResult: null,
    typingTimer: null,
    keyPrompt: null,
    canRerank: false,       // the collection's model has an ITM head (stats.can_rerank)
    like: null,             // the result whose "more like this" search is shown (searched again when filters change)
    statsLoaded: false,     // api/stats answered (the footer and the re-rank toggle are set)
    lastRerun: { key: '', at: 0 },  // rerun's last search: Enter in a filter field fires its change and the submit
    draftEntry: false,
    focusAfterRender: null, // after "Show more": {seq, index} of the first new result, focused when that answer shows      // the current history entry was written by typing, not yet a search the user committed
  };

  // ---- API -------------------------------------------------------------------------------------
  const apiKey = window.clipsearchApiKey(els, state, KEY_STORAGE);  // api-key.js: the key, its prompt, fetch
  const api = (path, options) => apiKey.request(path, options);

  async function apiJson(path, options) {
    return (await api(path, options)).json();
  }

  // Images: a plain src without a key; with a key, fetched with the header and shown as a blob: URL.
  async function showImage(img, url) {
    if (!state.apiKey) { img.src = url; return; }
    try {
      const blob = await (await api(url)).blob();
      const objectUrl = URL.createObjectURL(blob);
      state.objectUrls.push(objectUrl);
      img.src = objectUrl;
    } catch (err) {
      img.alt = `${img.alt} (could not load: ${err.message})`;
    }
  }

  function releaseImages() {
    state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
    state.objectUrls = [];
  }

  // ---- status ----------------------------------------------------------------------------------
  function setStatus(text) { els.status.textContent = text; }
  function showError(message) { els.error.textContent = message; els.error.hidden = false; }
  function clearError() { els.error.hidden = true; els.error.textContent = ''; }
  function fileName(path) { return path.split(/[\\/]/).pop(); }

  // ---- searches --------------------------------------------------------------------------------
  async function runSearch(describe, request) {
    const seq = ++state.requestSeq;
    clearError();
    setStatus(`Searching ${describe}…`);
    els.results.setAttribute('aria-busy', 'true');
    try {
      const answer = await request();
      if (!state.statsLoaded) loadStats();  // it failed before an API key was entered: the footer and re-rank toggle
      if (seq !== state.requestSeq) return;
      renderResults(answer.results);
      const count = answer.results.length;
      const filtered = answer.filters ? ` Only photos ${answer.filters}.` : '';
      setStatus(count === 0
        ? `No photos found ${describe}. ${answer.note || `Try other words or another image.${filtered}`}`
        : `${count} result${count === 1 ? '' : 's'} ${describe}, best first (${Math.round(answer.took_ms)} ms).${filtered}`);
      // As many results as asked for: there may be more. The button asks again for the next size up.
      els.showMore.hidden = !(count > 0 && count >= k() && nextK() !== null);
    } catch (err) {
      if (seq !== state.requestSeq) return;
      els.showMore.hidden = true;
      renderResults([]);
      setStatus('The search failed.');
      showError(err.message);
    } finally {
      if (seq === state.requestSeq) els.results.removeAttribute('aria-busy');
    }
  }

  function k() { return Number(els.k.value) || 20; }

  // The next result count offered after the current one (null: none; re-ranking scores at most 256 a search).
  function nextK() {
    const next = Array.from(els.k.options).find((o) => Number(o.value) > k() && !(reranking() && o.disabled));
    return next ? next.value : null;
  }

  function offerRerankSizes() {
    Array.from(els.k.options).forEach((o) => { o.disabled = reranking() && o.hasAttribute('data-no-rerank'); });
    if (els.k.selectedOptions[0] && els.k.selectedOptions[0].disabled) els.k.value = '200';
  }
  function reranking() { return state.canRerank && els.rerank.checked; }
  function percent(probability) { return `${Math.round(probability * 100)}%`; }

  // ---- filters: the same names as the REST API's parameters (in, after, before, orientation, min_size) ---------
  function filterEntries() {
    const entries = [
      ['in', els.filterIn.value.trim()], ['after', els.filterAfter.value], ['before', els.filterBefore.value],
      ['orientation', els.filterOrientation.value], ['min_size', els.filterMinSize.value.trim()],
    ];
    return entries.filter(([, value]) => value);
  }

  function showFiltersActive() { els.filters.classList.toggle('active', filterEntries().length > 0); }

  // ---- search state in the URL (?q=&k=&rerank=1&min_match=&in=&after=...), so a reload or a shared link searches again
  function searchParams(q) {
    const params = new URLSearchParams();
    if (q) params.set('q', q);
    if (els.k.value !== '20') params.set('k', els.k.value);
    if (reranking()) {
      params.set('rerank', '1');
      if (els.minMatch.value) params.set('min_match', els.minMatch.value);
    }
    filterEntries().forEach(([name, value]) => params.set(name, value));
    if (!q && state.like) params.set('like', String(state.like.id));
    return params;
  }

  // `push`: a new history entry (a "more like this" step, which Back undoes); else the current one is updated.
  function saveState(q, push = false) {
    const query = searchParams(q).toString();
    const url = window.location.pathname + (query ? `?${query}` : '') + window.location.hash;
    if (url !== window.location.pathname + window.location.search + window.location.hash) {
      window.history[push ? 'pushState' : 'replaceState'](null, '', url);
    }
  }

  function selectIfOffered(select, value) {
    if (value !== null && Array.from(select.options).some((o) => o.value === value)) select.value = value;
  }

  function restoreState() {
    const params = new URLSearchParams(window.location.search);
    if (params.get('q')) els.query.value = params.get('q');
    const wanted = params.get('k');
    if (wanted && /^[0-9]{1,4}$/.test(wanted) && Number(wanted) >= 1 && Number(wanted) <= 1000 &&
        !Array.from(els.k.options).some((o) => o.value === String(Number(wanted)))) {
      const option = new Option(String(Number(wanted)), String(Number(wanted)));
      if (Number(wanted) > 256) option.setAttribute('data-no-rerank', '');
      const after = Array.from(els.k.options).find((o) => Number(o.value) > Number(wanted));
      els.k.add(option, after || null);
    }
    selectIfOffered(els.k, wanted && /^[0-9]+$/.test(wanted) ? String(Number(wanted)) : wanted);
    els.rerank.checked = params.get('rerank') === '1' || params.get('rerank') === 'true';
    selectIfOffered(els.minMatch, params.get('min_match'));
    els.minMatch.disabled = !els.rerank.checked;
    offerRerankSizes();
    els.filterIn.value = params.get('in') || '';
    els.filterAfter.value = params.get('after') || '';
    els.filterBefore.value = params.get('before') || '';
    selectIfOffered(els.filterOrientation, params.get('orientation'));
    els.filterMinSize.value = params.get('min_size') || '';
    showFiltersActive();
    const like = params.get('like');
    if (!params.get('q')) els.query.value = '';
    state.like = !params.get('q') && like && /^[0-9]{1,18}$/.test(like)
      ? (state.like && String(state.like.id) === like ? state.like : { id: Number(like), path: `#${like}` }) : null;
  }

  // History: a search the user committed (Enter, or a "more like this" step, or the page as loaded) keeps its entry, so
  // Back returns to it; typing writes one new entry after it and then keeps updating that one until it is committed.
  function searchText(submitted = false) {
    const q = els.query.value.trim();
    const shownQ = new URLSearchParams(window.location.search).get('q') || '';
    saveState(q, q !== shownQ && !state.draftEntry);
    state.draftEntry = !submitted && (q !== shownQ || state.draftEntry);
    if (q) state.like = null;
    if (!q) {
      state.requestSeq++;
      renderResults([]);
      clearError();
      setStatus('Type to search your photos.');
      return;
    }
    const params = new URLSearchParams({ q, k: String(k()) });
    if (reranking()) {
      params.set('rerank', 'true');
      // Every shown result re-scored: past rerank_k a hit would keep its cosine, a score on another scale.
      params.set('rerank_k', String(k()));
      if (els.minMatch.value) params.set('min_match', els.minMatch.value);
    }
    filterEntries().forEach(([name, value]) => params.set(name, value));
    const how = reranking() ? `for “${q}”, re-ranked` : `for “${q}”`;
    runSearch(how, () => apiJson(`api/search?${params}`));
  }

  function searchExample() {
    if (!state.exampleFile) return;
    const form = new FormData();
    form.append('file', state.exampleFile, state.exampleFile.name || 'pasted-image');
    form.append('k', String(k()));
    // An example uploaded to find where it is: its exact copies in the collection are shown, unless unticked.
    form.append('include_self', els.includeSelf.checked ? 'true' : 'false');
    filterEntries().forEach(([name, value]) => form.append(name, value));
    saveState('');
    runSearch('like your image', async () => {
      try {
        return await apiJson('api/search/image', { method: 'POST', body: form });
      } catch (err) {
        // The server refused the file itself (too large, not an image, an odd shape): it stops being the example,
        // so that a filter change does not send it again and labels cannot be asked of it.
        if ([400, 413, 415].includes(err.status)) dropExample();
        throw err;
      }
    });
  }

  function searchLike(result, push = true) {
    els.query.value = '';
    const step = push && !(state.like && state.like.id === result.id);
    state.like = result;
    saveState('', step);
    state.draftEntry = false;
    const body = { image_id: result.id, k: k(), ...Object.fromEntries(filterEntries()) };
    const run = () => runSearch(`like ${fileName(result.path)}`, () => apiJson('api/search', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    }));
    if (result.path !== `#${result.id}`) { run(); return; }
    // Named by the URL alone (a reload, Back/Forward, a shared link): its file name first, for the status line. An
    // unknown id is left to the search, whose error says so.
    const seq = state.requestSeq;
    const stillWanted = () => seq === state.requestSeq && state.like === result;
    apiJson(`api/images/${result.id}`).then((info) => {
      if (!stillWanted()) return;
      result.path = info.path;
      run();
    }, () => { if (stillWanted()) run(); });
  }

  // The current search again (after k or a filter changed): by text, by the "more like this" image, or by the example.
  function rerun(submitted = false) {
    const file = state.exampleFile;
    const key = `${searchParams(els.query.value.trim())}|${file ? `${file.name}:${file.size}:${file.lastModified}` : ''}`;
    const now = Date.now();
    if (key === state.lastRerun.key && now - state.lastRerun.at < 400) {  // the same search a moment ago
      if (submitted) state.draftEntry = false;  // Enter in a filter field: its change ran it, the submit commits it
      return;
    }
    state.lastRerun = { key, at: now };
    if (els.query.value.trim()) searchText(submitted);
    else if (state.like) searchLike(state.like, false);
    else if (state.exampleFile) searchExample();
    else searchText(submitted);  // nothing to search: clears the results and keeps the state in the URL
  }

  // ---- results grid ----------------------------------------------------------------------------
  // A search answered late (after typing paused, or slowly on a busy server) replaces the grid under a user who
  // may already be moving through it with the arrow keys: focus then stays at the same position in the new grid
  // (or on the grid itself when it is empty) instead of falling back to the page body.
  function renderResults(results) {
    const hadFocus = els.results.contains(document.activeElement);
    const focused = hadFocus ? document.activeElement.closest('.result') : null;
    releaseImages();
    state.results = results;
    els.results.replaceChildren();
    if (!results.length) els.showMore.hidden = true;  // cleared (query, example, Back to an empty page): nothing more
    results.forEach((result, index) => {
      const item = document.createElement('li');
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'result';
      button.dataset.id = String(result.id);
      button.dataset.index = String(index);
      button.tabIndex = index === 0 ? 0 : -1;  // roving focus: Tab enters the grid once, arrows move
      const name = fileName(result.path);
      const score = result.score.toFixed(3);
      const match = result.match == null ? '' : `match ${percent(result.match)}`;
      const gone = result.missing ? ' The file is no longer on disk.' : '';
      button.setAttribute('aria-label',
        `${index + 1}. ${name}, score ${score}${match ? `, ${match}` : ''}.${gone} Open for the full image and more like this.`);
      const img = document.createElement('img');
      img.alt = name;
      img.loading = 'lazy';
      img.width = 256;
      img.height = 256;
      const caption = document.createElement('span');
      caption.className = 'caption';
      caption.innerHTML = '<span class="name"></span><span class="score"></span>';
      caption.querySelector('.name').textContent = `${index + 1}. ${name}`;
      const scoreText = caption.querySelector('.score');
      scoreText.textContent = score;
      scoreText.title = result.itc_score == null
        ? 'similarity of the photo to the query (cosine, -1 to 1)'
        : `re-rank score: the image-text matching head's logit plus the similarity (${result.itc_score.toFixed(3)}); ` +
          'compare it only within one re-ranked search';
      if (match) {
        const matchText = document.createElement('span');
        matchText.className = 'match';
        matchText.textContent = match;
        caption.append(matchText);
      }
      if (result.missing) {  // moved or deleted since it was indexed: no image to show, and the page says why
        button.classList.add('missing');
        const note = document.createElement('span');
        note.className = 'gone';
        note.textContent = 'no longer on disk';
        caption.append(note);
      }
      if (result.date) {  // with a date filter: the date it compared, and which one
        const dateText = document.createElement('span');
        dateText.className = 'date';
        dateText.textContent = describeDate(result);
        caption.append(dateText);
      }
      button.append(img, caption);
      item.append(button);
      els.results.append(item);
      if (!result.missing) showImage(img, result.thumbnail_url);
    });
    const more = state.focusAfterRender;
    state.focusAfterRender = null;
    // "Show more": its own answer focuses the first new result (not a later search the user typed meanwhile)
    if (more !== null && more.seq === state.requestSeq && more.index < results.length) focusResult(more.index);
    else if (hadFocus) {
      if (results.length) focusResult(focused ? Number(focused.dataset.index) : 0);
      else els.results.focus();
    }
  }

  function describeDate(result) {
    const when = result.date.replace('T', ' ').slice(0, 16);
    return result.date_source === 'taken_at' ? `taken ${when}` : `file changed ${when}`;
  }

  function resultButtons() { return Array.from(els.results.querySelectorAll('.result')); }

  function focusResult(index) {
    const buttons = resultButtons();
    if (!buttons.length) return;
    const target = buttons[Math.max(0, Math.min(buttons.length - 1, index))];
    buttons.forEach((b) => { b.tabIndex = -1; });
    target.tabIndex = 0;
    target.focus();
  }

  function columns() {
    const buttons = resultButtons();
    if (buttons.length < 2) return 1;
    const top = buttons[0].getBoundingClientRect().top;
    const perRow = buttons.findIndex((b) => b.getBoundingClientRect().top > top + 1);
    return perRow === -1 ? buttons.length : perRow;
  }

  els.results.addEventListener('keydown', (event) => {
    const button = event.target.closest('.result');
    if (!button) return;
    const index = Number(button.dataset.index);
    const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(), ArrowUp: -columns(),
      Home: -index, End: resultButtons().length };
    if (event.key in moves) {
      event.preventDefault();
      focusResult(index + moves[event.key]);
    }
  });

  els.results.addEventListener('click', (event) => {
    const button = event.target.closest('.result');
    if (button) openViewer(state.results[Number(button.dataset.index)], button);
  });

  // ---- viewer ----------------------------------------------------------------------------------
  let returnFocus = null;

  function openViewer(result, opener) {
    state.openResult = result;
    returnFocus = opener;
    els.viewerTitle.textContent = fileName(result.path);
    els.viewerImage.alt = fileName(result.path);
    els.viewerImage.removeAttribute('src');
    els.viewerImage.hidden = Boolean(result.missing);
    if (!result.missing) showImage(els.viewerImage, result.image_url);
    const size = result.width && result.height ? `${result.width} × ${result.height} px · ` : '';
    const match = result.match == null ? '' : ` · match ${percent(result.match)}`;
    const date = result.date ? ` · ${describeDate(result)}` : '';
    const gone = result.missing
      ? 'This file is no longer on disk (moved or deleted since it was indexed); index its folder again to update ' +
        'the collection. More like this still works. · '
      : '';
    els.viewerMeta.textContent = `${gone}${size}score ${result.score.toFixed(3)}${match}${date} · ${result.path}`;
    els.openFull.href = result.image_url;
    els.openFull.hidden = Boolean(result.missing);
    els.viewer.showModal();
    els.moreLikeThis.focus();
  }

  // The close event is not part of closing: the browser delivers it later (Chromium with the next animation frame,
  // much later on a busy machine), and by then the user may have moved on, e.g. "/" to the search box right after
  // Escape. So focus goes back to the opener only if it is still nowhere else: on the page body or in the viewer.
  els.viewer.addEventListener('close', () => {
    const opener = returnFocus;
    returnFocus = null;
    const active = document.activeElement;
    const unclaimed = !active || active === document.body || els.viewer.contains(active);
    if (opener && unclaimed && document.contains(opener)) opener.focus();
  });
  els.closeViewer.addEventListener('click', () => els.viewer.close());
  // A plain link cannot carry the API key: with a key, fetch the file and open it as a blob: URL.
  els.openFull.addEventListener('click', async (event) => {
    if (!state.apiKey || !state.openResult) return;
    event.preventDefault();
    const opened = window.open('', '_blank');
    try {
      const blob = await (await api(state.openResult.image_url)).blob();
      const url = URL.createObjectURL(blob);
      if (opened) opened.location.href = url; else window.location.assign(url);
    } catch (err) {
      if (opened) opened.close();
      showError(err.message);
    }
  });
  els.viewer.addEventListener('click', (event) => { if (event.target === els.viewer) els.viewer.close(); });
  els.moreLikeThis.addEventListener('click', () => {
    const result = state.openResult;
    returnFocus = null;
    els.viewer.close();
    if (result) searchLike(result);
  });

  // ---- example image: drop, paste, pick ---------------------------------------------------------
  function useExample(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith('image/')) {
      showError(`${file.name || 'That file'} is not an image.`);
      return;
    }
    state.exampleFile = file;
    if (state.exampleUrl) URL.revokeObjectURL(state.exampleUrl);
    state.exampleUrl = URL.createObjectURL(file);
    els.exampleImage.src = state.exampleUrl;
    els.example.hidden = false;
    els.labelResults.replaceChildren();
    els.query.value = '';
    state.like = null;
    searchExample();
  }

  els.fileInput.addEventListener('change', () => {
    useExample(els.fileInput.files[0]);
    els.fileInput.value = '';
  });
  const fileLabel = els.dropZone.querySelector('.file-button');
  fileLabel.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' || event.key === ' ') { event.preventDefault(); els.fileInput.click(); }
  });
  els.dropZone.addEventListener('keydown', (event) => {
    if (event.target === els.dropZone && (event.key === 'Enter' || event.key === ' ')) {
      event.preventDefault();
      els.fileInput.click();
    }
  });
  ['dragenter', 'dragover'].forEach((type) => els.dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    els.dropZone.classList.add('dragging');
  }));
  ['dragleave', 'drop'].forEach((type) => els.dropZone.addEventListener(type, () => {
    els.dropZone.classList.remove('dragging');
  }));
  els.dropZone.addEventListener('drop', (event) => {
    event.preventDefault();
    event.stopPropagation();  // the window's own drop handler below would upload it a second time
    useExample(event.dataTransfer.files[0]);
  });
  // Dropping an image anywhere else should not navigate away from the page.
  window.addEventListener('dragover', (event) => event.preventDefault());
  window.addEventListener('drop', (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) useExample(event.dataTransfer.files[0]);
  });
  document.addEventListener('paste', (event) => {
    const item = Array.from(event.clipboardData ? event.clipboardData.items : [])
      .find((i) => i.kind === 'file' && i.type.startsWith('image/'));
    if (item) {
      event.preventDefault();
      useExample(item.getAsFile());
    }
  });

  function dropExample() {
    state.exampleFile = null;
    if (state.exampleUrl) URL.revokeObjectURL(state.exampleUrl);
    state.exampleUrl = null;
    els.example.hidden = true;
    els.labelResults.replaceChildren();
  }

  els.clearExample.addEventListener('click', () => {
    dropExample();
    state.requestSeq++;  // its results go with it
    renderResults([]);
    setStatus('Type to search your photos.');
    els.query.focus();
  });

  els.classifyForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!state.exampleFile) return;
    const form = new FormData();
    form.append('file', state.exampleFile, state.exampleFile.name || 'pasted-image');
    form.append('labels', els.labels.value);
    clearError();
    els.labelResults.replaceChildren();
    try {
      const answer = await apiJson('api/classify', { method: 'POST', body: form });
      answer.labels.forEach((entry) => {
        const li = document.createElement('li');
        const label = document.createElement('span');
        label.textContent = entry.label;
        const meter = document.createElement('meter');
        meter.min = 0; meter.max = 1; meter.value = entry.probability;
        meter.setAttribute('aria-label', `${entry.label} probability`);
        const percent = document.createElement('span');
        percent.className = 'probability';
        percent.textContent = `${(entry.probability * 100).toFixed(1)}%`;
        li.append(label, meter, percent);
        els.labelResults.append(li);
      });
    } catch (err) {
      showError(err.message);
    }
  });

  // ---- text search -----------------------------------------------------------------------------
  els.query.addEventListener('input', () => {
    clearTimeout(state.typingTimer);
    state.typingTimer = setTimeout(searchText, 250);
  });
  els.form.addEventListener('submit', (event) => {
    event.preventDefault();
    clearTimeout(state.typingTimer);
    rerun(true);
  });
  els.k.addEventListener('change', () => rerun());
  els.includeSelf.addEventListener('change', () => { if (state.exampleFile) searchExample(); });
  els.showMore.addEventListener('click', () => {
    const shown = resultButtons().length;
    const next = nextK();
    if (next === null) return;
    els.k.value = next;
    rerun();
    state.focusAfterRender = { seq: state.requestSeq, index: shown };  // keyboard users land on the first new result
  });
  // Filters search again when changed (text fields on Enter or when left, like the other form controls).
  [els.filterIn, els.filterAfter, els.filterBefore, els.filterOrientation, els.filterMinSize].forEach((control) => {
    control.addEventListener('change', () => { showFiltersActive(); rerun(); });
  });
  els.clearFilters.addEventListener('click', () => {
    [els.filterIn, els.filterAfter, els.filterBefore, els.filterOrientation, els.filterMinSize].forEach((c) => { c.value = ''; });
    showFiltersActive();
    rerun();
  });
  // Re-ranking applies to text searches only (the ITM head compares a text with each image).
  els.rerank.addEventListener('change', () => {
    els.minMatch.disabled = !els.rerank.checked;
    offerRerankSizes();
    if (els.query.value.trim()) searchText(); else saveState('');
  });
  els.minMatch.addEventListener('change', () => {
    if (els.query.value.trim()) searchText(); else saveState('');
  });
  els.query.addEventListener('keydown', (event) => {
    if (event.key === 'ArrowDown' && resultButtons().length) { event.preventDefault(); focusResult(0); }
  });
  document.addEventListener('keydown', (event) => {
    const typing = ['INPUT', 'SELECT', 'TEXTAREA'].includes(document.activeElement.tagName);
    if (event.key === '/' && !typing && !document.querySelector('dialog[open]')) {
      event.preventDefault();
      els.query.focus();
      els.query.select();
    }
  });

  els.keyCancel.addEventListener('click', () => els.keyDialog.close('cancel'));

  // ---- start -----------------------------------------------------------------------------------
  // The footer (collection, photos, model) and whether the model can re-rank. Resolves null when they are shown, else
  // the error (its `status` 401: no API key was given).
  async function loadStats() {
    try {
      const stats = await apiJson('api/stats');
      state.statsLoaded = true;
      state.canRerank = stats.can_rerank === true;
      els.rerankControls.hidden = !state.canRerank;
      offerRerankSizes();
      const model = stats.model ? ` · model ${stats.model.name}` : '';
      const link = document.createElement('a');
      link.href = 'docs';
      link.textContent = 'API docs';
      els.footer.textContent = `Collection “${stats.collection}”: ${stats.images} photos${model} · clipsearch ${stats.version} · `;
      els.footer.append(link);
      if (stats.images === 0) setStatus('This collection is empty. Index photos with: clipsearch index FOLDER');
      return null;
    } catch (err) {
      showError(err.status === 401 ? err.message : `Cannot reach the search service: ${err.message}`);
      return err;
    }
  }

  // The search the URL names (after a reload, a shared link, or Back/Forward): by text, or more like an image.
  function searchFromUrl() {
    if (els.query.value.trim()) searchText();
    else if (state.like) searchLike(state.like, false);
    else { state.requestSeq++; renderResults([]); setStatus('Type to search your photos.'); }
  }

  window.addEventListener('popstate', () => {
    state.draftEntry = false;  // the entry Back/Forward went to is kept; typing starts a new one after it
    restoreState();
    searchFromUrl();
  });

  async function start() {
    restoreState();
    // A dismissed API-key prompt is not asked again at once for the URL's search: the next search asks.
    const failure = await loadStats();
    const named = els.query.value.trim() || state.like;
    if (named && !(failure && failure.status === 401)) searchFromUrl();
  }

  start();
})();
