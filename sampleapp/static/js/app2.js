// Carousel sample script 2: marks that it loaded.
document.documentElement.dataset.script2 = 'loaded';
