// Carousel sample script 4: marks that it loaded.
document.documentElement.dataset.script4 = 'loaded';
